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


def build_field(config: dict[str, Any]) -> Field:
    """config: {'kind': 'hash' | 'mlp', 'box_min': [3], 'box_max': [3], 'n_images': int, **sizes}."""
    kwargs = dict(config)
    kind = kwargs.pop("kind")
    if kind not in FIELDS:
        raise UserError(f"unknown field '{kind}' (choose from {', '.join(FIELDS)})")
    kwargs["box_min"], kwargs["box_max"] = torch.tensor(kwargs["box_min"]), torch.tensor(kwargs["box_max"])
    return FIELDS[kind](**kwargs)


__all__ = ["FIELDS", "Field", "HashField", "MLPField", "build_field"]
