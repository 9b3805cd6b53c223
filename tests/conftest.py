"""Shared fixtures: the tiny synthetic city and the tiny oblique survey, generated once per test session."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mega_nerf.synthetic import generate_city


@pytest.fixture(scope="session")
def tiny_city(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset of the 'tiny' preset, seed 0, rendered on the CPU (with depth, config and overview)."""
    path = tmp_path_factory.mktemp("synthetic") / "tiny"
    generate_city(path, "tiny", seed=0, device="cpu", progress=False)
    return path


@pytest.fixture(scope="session")
def tiny_city_summary(tiny_city: Path) -> dict:
    """generate_city's summary of `tiny_city`, as saved in its scene.json."""
    return json.loads((tiny_city / "scene.json").read_text())


@pytest.fixture(scope="session")
def oblique_city(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset of the 'oblique_tiny' preset, seed 0, rendered on the CPU (with depth, config and overview)."""
    path = tmp_path_factory.mktemp("synthetic") / "oblique_tiny"
    generate_city(path, "oblique_tiny", seed=0, device="cpu", progress=False)
    return path


@pytest.fixture(scope="session")
def oblique_summary(oblique_city: Path) -> dict:
    """generate_city's summary of `oblique_city`, as saved in its scene.json."""
    return json.loads((oblique_city / "scene.json").read_text())
