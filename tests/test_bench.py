"""Every benchmark script imports and builds its options on the CPU. They run on GPU machines only, in sessions of
bounded device time: an API of ours that a script imports at its top having moved or been renamed fails here, not
there (imports inside functions, and what checkpoints hold, are not reached)."""
from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "common.py")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_bench_script_imports_and_answers_help(script: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts put bench/ first, to import its common.py
    monkeypatch.delitem(sys.modules, "common", raising=False)
    namespace = runpy.run_path(str(script), run_name="bench_check")  # its imports, not its main
    with mock.patch.object(sys, "argv", [str(script), "--help"]), pytest.raises(SystemExit) as end:
        namespace["main"]()
    assert end.value.code == 0 and "usage:" in capsys.readouterr().out


def test_the_bench_shell_scripts_parse() -> None:
    for script in sorted(BENCH.glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)
