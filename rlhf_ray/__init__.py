"""rlhf-ray: distributed RLHF on Ray for control (Christiano et al. 2017) and language models."""

__version__ = "0.1.0"
