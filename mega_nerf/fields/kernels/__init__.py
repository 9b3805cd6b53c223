"""Triton kernels, each beside the plain PyTorch reference that defines what it computes (docs/DESIGN.md, Kernels).

`MEGA_NERF_NO_TRITON=1` in the environment turns every kernel off: each module's `available()` then answers
False and the references run, to rule the kernels out when an image looks wrong or a run crashes on the GPU. The
variable is read once, when this package is imported (`ENABLED`).
"""
import os

ENABLED = os.environ.get("MEGA_NERF_NO_TRITON", "") != "1"
