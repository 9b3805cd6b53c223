"""A seeded procedural city rendered by exact ray casting: the built-in test and demo scene.

`generate_city` writes it as a Mega-NeRF dataset with ground-truth depth; `PRESETS` names its sizes and
surveys (level flights over a lawn-fringed city; oblique ones over a town in farmland and hills; eye-level
views along that town's streets).
"""
from mega_nerf.synthetic.generate import generate_city
from mega_nerf.synthetic.scene import PRESETS

__all__ = ["PRESETS", "generate_city"]
