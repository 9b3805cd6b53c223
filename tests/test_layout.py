"""The package layout: every console script answers --help, and layers point down (a sampler knows nothing of a
trainer): data/, fields/, rays.py, render.py, imaging.py and io.py import nothing from the stages above them; the
viewer sits on top, imported by the command line alone, and --help needs no viser."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
SCRIPTS = dict(re.findall(r'^(\S+) = "(\S+)"$', SECTION, re.M))
LOWER = ["mega_nerf/data", "mega_nerf/fields", "mega_nerf/rays.py", "mega_nerf/render.py", "mega_nerf/bounds.py",
         "mega_nerf/imaging.py", "mega_nerf/io.py", "mega_nerf/errors.py", "mega_nerf/lock.py",
         "mega_nerf/ordered.py"]
HIGHER = ("mega_nerf.training", "mega_nerf.merging", "mega_nerf.evaluation", "mega_nerf.partition.job",
          "mega_nerf.cli", "mega_nerf.viewer")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


# Calls every console script's entry point with --help, one after another in one fresh interpreter (one torch
# import, not one per script: 3 s each on 2 CPU cores), and prints {name: [exit code, what it printed]} as JSON.
HELP_ALL = """
import contextlib, importlib, io, json, sys
import mega_nerf.errors
mega_nerf.errors.QUICK_EXIT = False  # a command that returned would end this interpreter before it answers
answers = {}
for name, target in json.loads(sys.argv[1]).items():
    module, func = target.split(":")
    sys.argv, printed, code = [name, "--help"], io.StringIO(), None
    try:
        with contextlib.redirect_stdout(printed):
            getattr(importlib.import_module(module), func)()
    except SystemExit as exit:
        code = exit.code
    except Exception as error:  # reported as that script's failure; the others still answer
        code = repr(error)
    answers[name] = [code, printed.getvalue()]
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def help_texts() -> dict[str, list]:
    result = subprocess.run([sys.executable, "-c", HELP_ALL, json.dumps(SCRIPTS)], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_help(name: str, help_texts: dict[str, list]) -> None:
    code, printed = help_texts[name]
    assert code == 0, (code, printed)
    assert "usage:" in printed
    # every option with a default other than None shows it
    flat = " ".join(printed.split())
    assert "(default: " in flat, flat


def test_layers_point_down() -> None:
    files = [p for entry in LOWER for p in ((ROOT / entry).rglob("*.py") if (ROOT / entry).is_dir()
                                             else [ROOT / entry]) if p.exists()]
    assert len(files) > 10
    bad = [(str(f.relative_to(ROOT)), name) for f in files for name in _imports(f)
           if name.startswith(HIGHER)]
    assert not bad, bad


def test_io_is_the_lowest_layer() -> None:
    """io.py (atomic writes, image encoding, torch reads) sits under every module: of the package it uses errors.py
    only."""
    own = {name for name in _imports(ROOT / "mega_nerf" / "io.py") if name.startswith("mega_nerf")}
    assert all(name == "mega_nerf.errors" or name.startswith("mega_nerf.errors.") for name in own), own


def test_the_viewer_is_on_top() -> None:
    """Only cli/ imports mega_nerf.viewer (training's --viewer included), and the viewer imports no command."""
    package = ROOT / "mega_nerf"
    users = [str(f.relative_to(ROOT)) for f in package.rglob("*.py")
             if not f.is_relative_to(package / "viewer") and not f.is_relative_to(package / "cli")
             and any(name.startswith("mega_nerf.viewer") for name in _imports(f))]
    assert not users, users
    commands = [(str(f.relative_to(ROOT)), name) for f in (package / "viewer").rglob("*.py") for name in _imports(f)
                if name.startswith("mega_nerf.cli")]
    assert not commands, commands


def test_help_does_not_load_viser() -> None:
    code = ("import sys; from mega_nerf.cli import train, view; train.train_parser(); view.view_parser(); "
            "print('viser' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
