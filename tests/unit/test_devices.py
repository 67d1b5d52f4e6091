"""One device rule for every LLM role, from its placement, resolved without a GPU: a role
placed with GPUs computes on CUDA (bf16 where the device has it, with `model.dtype: auto`),
every other on the CPU; a role placed on a GPU whose process sees none fails, saying so."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.llm.modeling import resolve_dtype
from rlhf_ray.runtime.devices import actor_device, placed_device
from rlhf_ray.runtime.sections import RoleResources

pytestmark = pytest.mark.unit

ROLES = {"sft", "learner", "generation", "reward_trainer", "reward_model"}


def test_the_presets_place_every_role_on_the_cpu():
    for preset in ("llm-tiny-smoke", "smollm2-reviews"):
        assert load_config(preset).placement.devices() == dict.fromkeys(ROLES, "cpu")


def test_a_gpu_placement_puts_its_roles_on_cuda_and_only_those():
    cfg = load_config("llm-tiny-smoke", [
        "placement.learner.num_gpus=1", "placement.generation_worker.num_gpus=0.5",
        "placement.reward_model.num_gpus=0.25", "model.dtype=auto"])
    dev = cfg.placement.devices()
    assert dev == {"sft": "cuda", "learner": "cuda", "generation": "cuda",
                   "reward_trainer": "cpu", "reward_model": "cuda"}
    assert placed_device(RoleResources(num_gpus=0)) == "cpu"
    # auto: float32 on the CPU (bf16 matmuls are slower there); bf16 needs a GPU with it
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float32", "cuda") == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a process that sees no GPU")
def test_a_role_placed_on_a_gpu_it_cannot_see_fails_saying_so():
    assert actor_device("cpu") == "cpu" and actor_device(None) == "cpu"
    with pytest.raises(RuntimeError, match="learner rank 0 is placed on a GPU .* sees no CUDA"):
        actor_device("cuda", "learner rank 0")
