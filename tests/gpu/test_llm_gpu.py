"""The LLM roles on GPUs: HF generation and the learner on CUDA, the learner group over nccl,
and the vLLM generation backend. Each test skips, saying why, where its hardware or vLLM is
missing (vLLM has no CPU wheel; the machines this project is built on have no GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlhf_ray.llm import tiny
from rlhf_ray.llm.config import PPOConfig

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpu")
    tiny.build_model(path, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    return str(path)


@needs_cuda
def test_hf_generation_and_learner_step_on_cuda(tiny_path):
    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.learner import PPOLearner

    gen = HFGenerationWorker(tiny_path, {"max_new_tokens": 8}, device="cuda")
    out = gen.generate(tiny.prompts(16, seed=0), n=1, seed=0)
    assert len(out["response_ids"]) == 16
    ppo = PPOConfig(rollout_batch_size=16, minibatch_size=8, micro_batch_size=4).model_dump()
    lr = PPOLearner(0, 1, tiny_path, tiny_path, ppo, device="cuda", pad_id=gen.tok.pad_token_id)
    stats = lr.step({"prompt_ids": out["prompt_ids"], "response_ids": out["response_ids"],
                     "scores": np.linspace(-1, 1, 16)}, beta=0.05)
    assert stats["policy_version"] == 1 and np.isfinite(stats["pg_loss"])
    version, weights = lr.policy_weights()
    assert gen.update_weights(version, weights) == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs 2 CUDA devices")
def test_two_nccl_ranks_match_one(ray_cluster, tiny_path):
    ray = ray_cluster
    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.learner import PPOLearner

    gen = HFGenerationWorker(tiny_path, {"max_new_tokens": 6}, device="cpu")
    b = gen.generate(tiny.prompts(8, seed=1), n=1, seed=1)
    b["response_ids"] = [r[:1 + (i * 5) % 6] for i, r in enumerate(b["response_ids"])]
    b["scores"] = np.linspace(-1, 1, 8)
    ppo = PPOConfig(rollout_batch_size=8, minibatch_size=8, micro_batch_size=2).model_dump()
    L = ray.remote(PPOLearner).options(num_gpus=1, num_cpus=0)

    def shard(rows):
        return {"prompt_ids": [b["prompt_ids"][i] for i in rows],
                "response_ids": [b["response_ids"][i] for i in rows], "scores": b["scores"][rows],
                "prompt_len": max(map(len, b["prompt_ids"])),
                "response_len": max(map(len, b["response_ids"]))}

    one = L.remote(0, 1, tiny_path, tiny_path, ppo, pad_id=0)
    full = ray.get(one.gradients.remote(shard(list(range(8))), 0.1))
    ray.kill(one)
    pair = [L.remote(r, 2, tiny_path, tiny_path, ppo, pad_id=0) for r in range(2)]
    addr, port = ray.get(pair[0].address.remote())
    ray.get([p.init_group.remote(addr, port, "nccl") for p in pair])
    half = ray.get([pair[0].gradients.remote(shard([0, 2, 4, 6]), 0.1),
                    pair[1].gradients.remote(shard([1, 3, 5, 7]), 0.1)])[0]
    for name, g in full.items():
        np.testing.assert_allclose(half[name], g, rtol=1e-3, atol=1e-5, err_msg=name)


@pytest.mark.vllm
@needs_cuda
def test_vllm_weight_push_on_cuda(tiny_path):
    """The vLLM backend on CUDA (the `vllm` extra): after a push, the engine's log-probs of
    what it sampled are the pushed model's (the CPU build's test: tests/integration)."""
    from rlhf_ray.llm.modeling import load_policy, state_dict_cpu
    from rlhf_ray.llm.vllm_generation import VLLMGenerationWorker

    w = VLLMGenerationWorker(tiny_path, {"backend": "vllm", "max_new_tokens": 8,
                                         "vllm_gpu_memory_utilization": 0.2}, device="cuda")
    prompts = tiny.prompts(4, seed=2)
    a = w.generate(prompts, n=2, seed=7)
    model = load_policy(tiny_path)
    torch.manual_seed(0)
    new = {k: v + 0.5 * torch.randn_like(v) for k, v in state_dict_cpu(model).items()}
    assert w.update_weights(1, new) == 1
    b = w.generate(prompts, n=2, seed=7, logprobs=True)
    assert b["version"] == 1 and b["response_ids"] != a["response_ids"]
    model.load_state_dict(new)
    ids = torch.tensor([b["prompt_ids"][0] + b["response_ids"][0]])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    p = len(b["prompt_ids"][0])
    want = lp[p - 1:-1].gather(1, torch.tensor(b["response_ids"][0])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(b["logprobs"][0]), want, atol=1e-3, rtol=0)
