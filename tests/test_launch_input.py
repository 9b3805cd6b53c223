"""Bad input to the launchers is one line: mega-nerf-launch's --nproc_per_node, and the parscript job lines, run by
a shell as the dispatcher runs them (a fake `python` on PATH prints the arguments it would have trained with)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mega_nerf.cli.parscript import JOB, is_job_list
from mega_nerf.cli.parscript import main as parscript_main
from mega_nerf.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
VARIABLES = {"CONFIG_FILE": "the config file of every cell", "EXP_PREFIX": "the prefix of the experiment folders",
             "DATASET_PATH": "the dataset folder", "CHUNK_PREFIX": "the prefix of the chunk folders",
             "MASK_PATH": "the folder of the partition masks"}
# A line of the lists written before the variables were quoted (parscripts/run_4.txt's first, as shipped then).
OLD_LINE = ("python mega_nerf/train.py --config_file $CONFIG_FILE --exp_name ${EXP_PREFIX}0 --dataset_path "
            "$DATASET_PATH --chunk_paths ${CHUNK_PREFIX}0 --cluster_mask_path $MASK_PATH/0 $TRAIN_ARGS")
SHELLS = ["/bin/sh", *(["bash"] if shutil.which("bash") else [])]  # the dispatcher's (sh), and a user's


@pytest.mark.parametrize("count", ["0", "-1", "abc"])
def test_a_bad_nproc_per_node_is_one_line(count: str, tmp_path: Path) -> None:
    """--nproc_per_node 0 or fewer ended in torch's AssertionError traceback as its agent started; a word torchrun
    does not take said only that. Both: one line naming the option and what it takes, exit code 2, no rank run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "mega_nerf.cli.launch", "--standalone", "--nproc_per_node", count,
               "scripts/train_cells.py", "--help"]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [f"error: --nproc_per_node {count}: expected a positive integer, or gpu, "
                                          "xpu, cpu or auto (a rank per device)"]
    assert not list(tmp_path.iterdir())  # no torchrun log folder: it never started


def job_lines(tmp_path: Path, cells: int = 2) -> list[str]:
    """The job list make_parscript.py writes for `cells` cells, as lines."""
    jobs = tmp_path / "jobs.txt"
    parscript_main(["--cells", str(cells), "--output", str(jobs)])
    return jobs.read_text().splitlines()


def run_line(line: str, shell: str, tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    """`line` run by `shell -c` as parscript's worker runs it, with only `variables` of the job lines' set and a
    `python` on PATH that prints its arguments as JSON."""
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES and k != "TRAIN_ARGS"}
    env.update(variables, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([shell, "-c", line], env=env, capture_output=True, text=True, timeout=30)


def all_set(**changes: str) -> dict[str, str]:
    values = {"CONFIG_FILE": "c.yaml", "EXP_PREFIX": "exp-", "DATASET_PATH": "data", "CHUNK_PREFIX": "chunk-",
              "MASK_PATH": "masks"}
    return {**values, **changes}


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("value", [None, ""])
@pytest.mark.parametrize("name", list(VARIABLES))
def test_a_job_line_stops_on_an_unset_variable(name: str, value: str | None, shell: str, tmp_path: Path) -> None:
    """With EXP_PREFIX unset the jobs trained into ./0, ./1, ...; with CONFIG_FILE unset the error named another
    option. An unset or empty variable now ends the line in the shell, naming it, before python starts."""
    variables = all_set()
    if value is None:
        del variables[name]
    else:
        variables[name] = value
    result = run_line(job_lines(tmp_path)[1], shell, tmp_path, **variables)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().endswith(f"{name}: set {name} to {VARIABLES[name]}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("shell", SHELLS)
def test_a_job_line_keeps_a_path_with_a_space_whole(shell: str, tmp_path: Path) -> None:
    """CHUNK_PREFIX="/tmp/with space/chunk-" sent the chunks to two wrong places: each variable is now one
    argument, whatever it holds; TRAIN_ARGS still splits into options, and may be unset."""
    spaced = all_set(CONFIG_FILE="/a b/c.yaml", EXP_PREFIX="/a b/exp-", DATASET_PATH="/a b/data",
                     CHUNK_PREFIX="/tmp/with space/chunk-", MASK_PATH="/a b/masks")
    line = job_lines(tmp_path)[1]
    expected = ["mega_nerf/train.py", "--config_file", "/a b/c.yaml", "--exp_name", "/a b/exp-1", "--dataset_path",
                "/a b/data", "--chunk_paths", "/tmp/with space/chunk-1", "--cluster_mask_path", "/a b/masks/1"]
    for train_args, more in ((None, []), ("", []), ("--lr 0.1  --train_iterations 20", ["--lr", "0.1",
                                                                                      "--train_iterations", "20"])):
        variables = spaced if train_args is None else {**spaced, "TRAIN_ARGS": train_args}
        result = run_line(line, shell, tmp_path, **variables)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == expected + more


def test_the_shipped_job_lists_are_what_make_parscript_writes() -> None:
    """parscripts/run_K.txt: K cells in cell order, each line as make_parscript.py writes it today."""
    shipped = sorted((ROOT / "parscripts").glob("run_*.txt"))
    assert [p.name for p in shipped] == ["run_4.txt", "run_8.txt"]
    for path in shipped:
        cells = int(path.stem.removeprefix("run_"))
        assert path.read_text() == "".join(JOB.format(k=k) + "\n" for k in range(cells)), path.name


def test_a_job_list_is_one_of_ours_in_either_format(tmp_path: Path) -> None:
    """A list of earlier versions' lines (unquoted) or of today's may be replaced by --output; a different file,
    even one that differs by a line or mixes the two formats, may not."""
    new = job_lines(tmp_path, cells=3)
    old = [OLD_LINE.replace("}0", f"}}{k}").replace("/0 ", f"/{k} ") for k in range(3)]
    assert old[2].count("2") == 3 and old[2] != new[2]
    lists = {"old": old, "new": new, "mixed": [new[0], old[1]], "edited": [new[0], new[1] + "; rm -rf ~"],
             "other": ["lr: 0.01"], "empty": [], "blank line": [new[0], ""]}
    for name, lines in lists.items():
        path = tmp_path / f"{name}.txt"
        path.write_text("".join(f"{line}\n" for line in lines))
        assert is_job_list(path) == (name in ("old", "new")), name
    parscript_main(["--cells", "2", "--output", str(tmp_path / "old.txt")])  # replaced by today's lines
    assert (tmp_path / "old.txt").read_text().splitlines() == new[:2]
    with pytest.raises(UserError, match="exists and is not a job list"):
        parscript_main(["--cells", "2", "--output", str(tmp_path / "mixed.txt")])
