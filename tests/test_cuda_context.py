"""cuda_context: the primary context made early goes to the GPU the job will use (a `--device cuda:N` it names, else
distributed's pick: the local rank modulo the GPUs visible, or a lone run's first GPU), and nothing is made without a
driver, a device, a CUDA build of torch, a valid rank or words that tell the GPU for sure. The driver is a fake
that records the calls, and torch counts as a CUDA build; no test runs the real driver (its effect on a GPU is
measured in bench/RESULTS.md, twenty-sixth session, call 9)."""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from unittest import mock

import pytest

from mega_nerf import cuda_context


class FakeDriver:
    """The four driver calls make_context_early uses, with `count` devices; cuInit answers `init`."""

    def __init__(self, count: int, init: int = 0) -> None:
        self.count, self.init, self.calls = count, init, []

    def cuInit(self, flags: int) -> int:
        self.calls.append(("init", flags))
        return self.init

    def cuDeviceGetCount(self, count: ctypes._CArgObject) -> int:
        count._obj.value = self.count
        return 0

    def cuDeviceGet(self, device: ctypes._CArgObject, ordinal: int) -> int:
        self.calls.append(("device", ordinal))
        device._obj.value = 100 + ordinal
        return 0

    def cuDevicePrimaryCtxRetain(self, context: ctypes._CArgObject, device: ctypes.c_int) -> int:
        self.calls.append(("retain", device.value))
        return 0


def run_with(driver: FakeDriver | None, env: dict[str, str], argv: tuple[str, ...] = (),
             pick: cuda_context.Pick = cuda_context.PARTITION) -> threading.Thread | None:
    """make_context_early for the words `argv` under `env` with `driver` as libcuda (None: no driver installed);
    waits for its thread."""
    def load(name: str) -> FakeDriver:
        if driver is None:
            raise OSError(f"{name}: cannot open shared object file")
        return driver
    with mock.patch.dict("os.environ", env, clear=True), mock.patch.object(cuda_context.ctypes, "CDLL", load), \
            mock.patch.object(cuda_context, "torch_has_cuda", return_value=True):
        thread = cuda_context.make_context_early(argv, pick)
        assert thread is None or os.environ["CUDA_MODULE_LOADING"] == "LAZY"
    if thread is not None:
        thread.join(10)
    return thread


@pytest.mark.parametrize(("env", "count", "ordinal"), [
    ({}, 2, 0),  # alone
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, 2, 1),  # more ranks than GPUs share them
    ({"RANK": "2", "WORLD_SIZE": "4"}, 4, 2),  # no LOCAL_RANK: the rank
    ({"RANK": "2"}, 4, 0),  # not a job (no WORLD_SIZE): alone
])
def test_the_context_is_made_on_the_jobs_gpu(env: dict[str, str], count: int, ordinal: int) -> None:
    driver = FakeDriver(count)
    assert run_with(driver, env) is not None
    assert driver.calls == [("init", 0), ("device", ordinal), ("retain", 100 + ordinal)]


def test_nothing_is_made_without_a_driver_a_device_or_a_valid_rank() -> None:
    assert run_with(None, {}) is None
    no_device = FakeDriver(1, init=100)  # CUDA_ERROR_NO_DEVICE (CUDA_VISIBLE_DEVICES empty)
    run_with(no_device, {})
    assert no_device.calls == [("init", 0)]
    none_visible = FakeDriver(0)
    run_with(none_visible, {})
    assert none_visible.calls == [("init", 0)]
    bad_rank = FakeDriver(2)
    assert run_with(bad_rank, {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}) is None
    assert bad_rank.calls == []


def test_a_cpu_build_of_torch_gets_no_context() -> None:
    """Where torch has no CUDA library (a CPU wheel) the driver is never touched; this machine's torch says which
    it is, and torch_has_cuda agrees with it."""
    import torch

    assert cuda_context.torch_has_cuda() == (torch.version.cuda is not None)
    driver = FakeDriver(2)
    with mock.patch.object(cuda_context.ctypes, "CDLL", lambda name: driver), \
            mock.patch.object(cuda_context, "torch_has_cuda", return_value=False):
        assert cuda_context.make_context_early([], cuda_context.PARTITION) is None
    assert driver.calls == []


TRAIN, CELLS, PARTITION = cuda_context.TRAIN, cuda_context.TRAIN_CELLS, cuda_context.PARTITION


@pytest.mark.parametrize(("argv", "pick", "gpu"), [
    ([], TRAIN, (0, False)),  # a lone train run: torch's current device, whatever the rank variables say
    ([], CELLS, (3, False)),
    (["--device", "cuda"], CELLS, (3, False)),  # bare cuda: the rank's device (distributed sets it current)
    (["--device", "cuda:2"], CELLS, (2, True)),
    (["--dev=cuda:1", "--exp_name", "e"], TRAIN, (1, True)),  # argparse takes a prefix of the name
    (["--device", "cuda:1", "--device", "cuda:0"], TRAIN, (0, True)),  # the last one counts, as in argparse
    (["--device", "cpu"], TRAIN, None),
    (["--device", "cuda:x"], TRAIN, None),  # the parser reports these
    (["--device", "cuda:01"], TRAIN, None),
    (["--device"], TRAIN, None),
    (["--config_file", "missing.yaml"], TRAIN, None),
    (["--device", "cpu", "--config_file", "missing.yaml"], PARTITION, (3, False)),  # no --device: words not read
])
def test_the_gpu_is_read_from_the_words(argv: list[str], pick: cuda_context.Pick, gpu: tuple[int, bool] | None
                                        ) -> None:
    with mock.patch.dict("os.environ", {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}, clear=True):
        assert cuda_context.job_gpu(argv, pick) == gpu


def test_a_config_that_mentions_a_device_leaves_the_gpu_unknown(tmp_path: Path) -> None:
    """A config file's device (a key, or the word anywhere, or an escape that could spell it) is for the parser to
    read: no guess, no context."""
    plain, named, escaped = tmp_path / "plain.yaml", tmp_path / "named.yaml", tmp_path / "escaped.yaml"
    plain.write_text("dataset_path: d\ntrain_iterations: 100\n")
    named.write_text("dataset_path: d\n'device': cuda:1\n")
    escaped.write_text('dataset_path: d\n"d\\x65vice": cuda:1\n')
    assert cuda_context.job_gpu(["--config_file", str(plain)], TRAIN) == (0, False)
    assert cuda_context.job_gpu([f"--config={plain}", "--device", "cuda:1"], TRAIN) == (1, True)
    for argv in (["--config_file", str(named)], ["--config_f", str(named)], ["--config", str(escaped)],
                 ["--device", "cuda:1", "--config", str(named)]):
        assert cuda_context.job_gpu(argv, TRAIN) is None, argv
    driver = FakeDriver(2)
    assert run_with(driver, {}, ("--config_file", str(named)), TRAIN) is None
    assert driver.calls == []
    assert run_with(driver, {}, ("--device", "cuda:1"), TRAIN) is not None
    assert driver.calls == [("init", 0), ("device", 1), ("retain", 101)]


def test_a_named_gpu_this_machine_lacks_gets_no_context() -> None:
    """--device cuda:2 on a machine with 2 GPUs: the run is refused (errors.check_device); no context on another."""
    driver = FakeDriver(2)
    assert run_with(driver, {}, ("--device", "cuda:2"), TRAIN) is not None
    assert driver.calls == [("init", 0)]
