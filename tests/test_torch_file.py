"""data.torch_file's fast reader against its reference, torch.load(weights_only=True) (io.load_torch)."""
from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mega_nerf.data.torch_file import _load_fast, load_plain
from mega_nerf.errors import UnreadableFile
from mega_nerf.io import load_torch


def same(a: object, b: object) -> bool:
    """Equal values of the same types; tensors also of the same dtype, shape, strides and storage offset."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and (a.dtype, a.shape, a.stride(), a.storage_offset())
                == (b.dtype, b.shape, b.stride(), b.storage_offset()) and torch.equal(a, b))
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def plain_values() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    poses = torch.randn(8, 3, 4, generator=g)
    shared = torch.arange(6.0)
    return {
        "metadata": {"W": 400, "H": 300, "intrinsics": torch.tensor([300.0, 300.0, 200.0, 150.0]),
                     "c2w": poses[5], "distortion": torch.zeros(5, dtype=torch.float64)},
        "coordinates": {"origin_drb": torch.tensor([1.5, -2.0, 3.25], dtype=torch.float64),
                        "pose_scale_factor": 123.4},
        "views": {"transposed": poses[2].t(), "strided": poses[:, 1, ::2], "scalar": poses[3, 2, 1],
                  "empty": torch.empty(0, 3), "twice": [shared, shared[2:]]},
        "dtypes": [torch.tensor([True, False]), torch.tensor([1, -2], dtype=torch.int64),
                   torch.tensor([3, 4], dtype=torch.int32), torch.tensor([5], dtype=torch.int16),
                   torch.tensor([-6], dtype=torch.int8), torch.tensor([7], dtype=torch.uint8),
                   torch.tensor([0.5], dtype=torch.float16), torch.tensor([0.25], dtype=torch.bfloat16)],
        "python": {"s": "text", "n": None, "f": 1e-3, "b": True, "t": (1, 2.0), "nested": [[1], {"k": [2, 3]}],
                   "ordered": collections.OrderedDict(a=1, b=torch.ones(2))},
    }


@pytest.mark.parametrize("name", sorted(plain_values()))
def test_plain_files_are_read_fast_and_equal_the_reference(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.pt"
    torch.save(plain_values()[name], path)
    fast = _load_fast(path)  # the fast path itself: no fallback hides behind the comparison
    assert same(fast, load_torch(path, "torch file"))
    assert same(load_plain(path, "torch file"), fast)


def test_what_the_fast_path_does_not_read_goes_to_the_reference(tmp_path: Path) -> None:
    """A gradient-carrying tensor, the legacy (pre-zip) format: read by the reference, as it reads them. A numpy
    array, which weights_only refuses by default: the reference's one-line error."""
    grad = tmp_path / "grad.pt"
    torch.save({"w": torch.ones(3, requires_grad=True)}, grad)
    legacy = tmp_path / "legacy.pt"
    torch.save({"W": 4, "c2w": torch.eye(3, 4)}, legacy, _use_new_zipfile_serialization=False)
    for path in (grad, legacy):
        assert same(load_plain(path, "torch file"), load_torch(path, "torch file"))
    assert load_plain(grad, "torch file")["w"].requires_grad
    array = tmp_path / "array.pt"
    torch.save({"a": np.arange(3)}, array)
    with pytest.raises(UnreadableFile) as reference:
        load_torch(array, "torch file")
    with pytest.raises(UnreadableFile, match=f"^{re.escape(str(reference.value))}$"):
        load_plain(array, "torch file")


@pytest.mark.parametrize("cut", [10, 200, -40])
def test_a_truncated_file_is_the_references_one_line_error(cut: int, tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save(plain_values()["metadata"], path)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(UnreadableFile, match=f"^{re.escape(str(path))}: unreadable or truncated torch file"):
        load_plain(path, "torch file")
