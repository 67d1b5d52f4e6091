"""Where a role's tensors live: one rule for every role, decided by its placement.

A role placed with GPUs (`num_gpus > 0` in its resources) computes on CUDA, every other on
the CPU; `model.dtype: auto` then means bfloat16 on a GPU that computes in it, float32
elsewhere (`llm.modeling.resolve_dtype`). The controller decides each role's device from the
config (`placed_device`) and hands it to the role; the role, in its own process, turns it
into a torch device (`actor_device`), where Ray has made its bundle's GPU the only one it
sees. So the same config runs on a laptop and on a GPU cluster, and a role placed on a GPU
whose process sees none fails at once, saying so, instead of training on the CPU unnoticed.
"""

from __future__ import annotations

import os

import torch


def placed_device(resources) -> str:
    """"cuda" for a role whose resources (`RoleResources`) ask for a GPU, else "cpu"."""
    return "cuda" if float(getattr(resources, "num_gpus", 0) or 0) > 0 else "cpu"


def actor_device(device: str | None = None, role: str = "this role") -> str:
    """The torch device of a role's process: "cuda" -> the GPU Ray gave it ("cuda:N");
    None (a role built outside the controller, e.g. in a notebook): CUDA where visible."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"{role} is placed on a GPU (num_gpus > 0) but its process "
                               f"sees no CUDA device (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
                               f"torch {torch.__version__})")
        if device == "cuda":
            return f"cuda:{torch.cuda.current_device()}"
    return device
