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


# Options whose default has changed, by their key in a checkpoint's field config or render settings: ({each value
# an earlier default saved, None where the key was absent: the option that gives it back}, the value now). A
# checkpoint saved before a change differs from a run of today's defaults there, and the errors say how.
CHANGED_DEFAULTS: dict[str, tuple[dict[Any, str], Any]] = {
    "appearance_dim": ({32: "--appearance_dim 32"}, 8),  # a hash field's; complete_config writes the old one in
    "horizon_background": ({None: "--no_horizon_background"}, True),
    "log2_table_size": ({19: "--log2_hashmap_size 19", 21: "--log2_hashmap_size 21"}, 22),
    "bg_samples": ({32: "--bg_samples 32", 64: "--bg_samples 64"}, 96),
}


def old_default_options(saved: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """The options that give back the old defaults where `saved` holds one and `asked` today's (CHANGED_DEFAULTS),
    and only where those are all that the two differ in: a field of another kind, or one trained without an
    altitude slab (no horizon background either), differs in more, and the hint would mislead. Field configs are
    compared completed, as config_differences does."""
    saved, asked = complete_config(saved), complete_config(asked)
    differing = {key for key in set(saved) | set(asked) if saved.get(key) != asked.get(key)}
    covered = {key: olds[saved.get(key)] for key, (olds, new) in CHANGED_DEFAULTS.items()
               if asked.get(key) == new and saved.get(key) in olds}
    return list(covered.values()) if differing <= covered.keys() else []


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
