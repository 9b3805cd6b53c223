"""Fields behind one interface (`Field`): `hash` (default, fast) and `mlp` (Mega-NeRF's network, the reference).

A field is rebuilt from a plain config dict (kind, box, image count, sizes), which checkpoints store so that every
file we write loads with torch.load(weights_only=True).
"""
from __future__ import annotations

from typing import Any

import torch

from mega_nerf.errors import UserError
from mega_nerf.fields.base import Field
from mega_nerf.fields.hash import HashField
from mega_nerf.fields.mlp import MLPField

FIELDS = {"hash": HashField, "mlp": MLPField}


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with its appearance width written in where it was left out (the field's unsaved_appearance_dim:
    a hash field's 32, saved without one while that was the default), so that two configs of one field compare
    equal."""
    if "appearance_dim" in config or config.get("kind") not in FIELDS:
        return config
    return {**config, "appearance_dim": FIELDS[config["kind"]].unsaved_appearance_dim}


def config_differences(saved: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """The keys in which two field configs differ once completed, each as 'key (saved value, asked value)'."""
    saved, asked = complete_config(saved), complete_config(asked)
    return [f"{key} ({saved.get(key, 'unset')}, {asked.get(key, 'unset')})"
            for key in sorted(set(saved) | set(asked)) if saved.get(key) != asked.get(key)]


# Field options whose default has changed: config key -> (what a field saved before the change holds, the option
# that asks for it). Resuming or merging such a field under today's defaults differs there; the error says how.
CHANGED_DEFAULTS = {"horizon_background": (None, "--no_horizon_background"),
                    "log2_table_size": (19, "--log2_hashmap_size 19")}


def old_default_options(saved: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """The options that give back an old default (CHANGED_DEFAULTS) where the two configs differ and one of them
    holds it."""
    return [option for key, (old, option) in CHANGED_DEFAULTS.items()
            if saved.get(key) != asked.get(key) and old in (saved.get(key), asked.get(key))]


def build_field(config: dict[str, Any]) -> Field:
    """config: {'kind': 'hash' | 'mlp', 'box_min': [3], 'box_max': [3], 'n_images': int, **sizes}; one saved
    by older code is read as it was meant (complete_config)."""
    kwargs = complete_config(dict(config))
    kind = kwargs.pop("kind")
    if kind not in FIELDS:
        raise UserError(f"unknown field '{kind}' (choose from {', '.join(FIELDS)})")
    kwargs["box_min"], kwargs["box_max"] = torch.tensor(kwargs["box_min"]), torch.tensor(kwargs["box_max"])
    return FIELDS[kind](**kwargs)


__all__ = ["FIELDS", "Field", "HashField", "MLPField", "build_field", "complete_config", "config_differences",
           "old_default_options"]
