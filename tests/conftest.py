"""Shared fixtures: the tiny synthetic city and the tiny oblique survey, generated once per test session."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mega_nerf.synthetic import generate_city


def _generate(tmp_path_factory: pytest.TempPathFactory, preset: str) -> Path:
    """A dataset of `preset`, seed 0, rendered on the CPU (with depth, config and overview)."""
    path = tmp_path_factory.mktemp("synthetic") / preset
    generate_city(path, preset, seed=0, device="cpu", progress=False)
    return path


@pytest.fixture(scope="session")
def tiny_city(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 'tiny' preset: a 2x2-block city flown over at 25 m."""
    return _generate(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_city_summary(tiny_city: Path) -> dict:
    """generate_city's summary of `tiny_city`, as saved in its scene.json."""
    return json.loads((tiny_city / "scene.json").read_text())


@pytest.fixture(scope="session")
def oblique_city(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 'oblique_tiny' preset: a 2x2-block town seen through 80 degree lenses pitched 30-60 degrees down."""
    return _generate(tmp_path_factory, "oblique_tiny")


@pytest.fixture(scope="session")
def oblique_summary(oblique_city: Path) -> dict:
    """generate_city's summary of `oblique_city`, as saved in its scene.json."""
    return json.loads((oblique_city / "scene.json").read_text())
