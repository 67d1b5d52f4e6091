"""LLM roles on the session's real local Ray cluster: the DDP learner group (gloo) and the
LM reward-model Serve deployment (batching, HTTP, in-place weight swap)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest

from rlhf_ray.llm import tiny
from rlhf_ray.llm.config import PPOConfig
from rlhf_ray.runtime.sections import RewardServeConfig


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-roles")
    tiny.build_model(path, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    return str(path)


def _rollout(tiny_paths, n: int, seed: int = 0) -> dict:
    from rlhf_ray.llm.generation import HFGenerationWorker

    w = HFGenerationWorker(tiny_paths, {"max_new_tokens": 6}, seed=seed)
    out = w.generate(tiny.prompts(n, seed=seed), n=1, seed=seed)
    # responses of different lengths (as EOS at different steps would give)
    out["response_ids"] = [r[:1 + (i * 5) % 6] for i, r in enumerate(out["response_ids"])]
    rng = np.random.default_rng(seed)
    out["scores"] = rng.normal(size=n).astype(np.float32)
    out["prompt_len"] = max(len(x) for x in out["prompt_ids"])
    out["response_len"] = max(len(y) for y in out["response_ids"])
    return out


@pytest.mark.parametrize("lora_r,top,tokens", [(0, None, None), (4, 1, 14)])
def test_two_learners_with_half_batches_match_one_with_the_whole(ray_cluster, tiny_paths, lora_r,
                                                                 top, tokens):
    """Global advantage whitening and global token normalization make DDP over 2 gloo
    ranks compute the gradients of the whole batch, though the ranks' token counts differ;
    also when the policy trains LoRA adapters (peft) on its top block, its reference is itself
    with adapters off, the frozen block's output is cached for the epochs, and micro batches
    sized by tokens give the two ranks different numbers of forward passes."""
    ray = ray_cluster
    from rlhf_ray.core.lm_ppo import micro_batches
    from rlhf_ray.llm.learner import PPOLearner
    from rlhf_ray.llm.modeling import make_batch

    batch = _rollout(tiny_paths, 8)
    ppo = PPOConfig(rollout_batch_size=8, minibatch_size=8, micro_batch_size=2,
                      micro_batch_tokens=tokens, entropy_coef=0.01).model_dump()
    if tokens:  # the ranks' plans differ in length: DDP must not need equal forward counts
        plans = [micro_batches(np.arange(4), *make_batch(
            [batch["prompt_ids"][i] for i in rows], [batch["response_ids"][i] for i in rows],
            0).lengths(), 2, tokens) for rows in ([0, 2, 4, 6], [1, 3, 5, 7])]
        assert len(plans[0]) != len(plans[1]), plans
    pad = 0
    Learner = ray.remote(PPOLearner).options(num_cpus=0.5)

    def shard(rows):
        return {k: ([batch[k][i] for i in rows] if isinstance(batch[k], list) else
                    (batch[k][rows] if isinstance(batch[k], np.ndarray) else batch[k]))
                for k in ("prompt_ids", "response_ids", "scores", "prompt_len", "response_len")}

    from rlhf_ray.llm.config import LoRAConfig

    lora = LoRAConfig(r=lora_r).model_dump()
    one = Learner.remote(0, 1, tiny_paths, tiny_paths, ppo, pad_id=pad, lora=lora,
                         train_top_layers=top)
    full = ray.get(one.gradients.remote(shard(list(range(8))), 0.1))
    ray.kill(one)
    pair = [Learner.remote(r, 2, tiny_paths, tiny_paths, ppo, pad_id=pad, lora=lora,
                           train_top_layers=top) for r in range(2)]
    addr, port = ray.get(pair[0].address.remote())
    assert ray.get([lr.init_group.remote(addr, port, "gloo") for lr in pair]) == [2, 2]
    halves = ray.get([pair[0].gradients.remote(shard([0, 2, 4, 6]), 0.1),
                      pair[1].gradients.remote(shard([1, 3, 5, 7]), 0.1)])
    lens = [sum(len(batch["response_ids"][i]) for i in rows) for rows in ([0, 2, 4, 6], [1, 3, 5, 7])]
    for lr in pair:
        ray.get(lr.close.remote())
        ray.kill(lr)
    assert set(full) == set(halves[0]) and len(full) > 4
    for name, g in full.items():
        # after DDP's all-reduce both ranks hold the same, whole-batch gradient
        np.testing.assert_allclose(halves[0][name], halves[1][name], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(halves[0][name], g, rtol=1e-4, atol=1e-6, err_msg=name)
    assert lens[0] != lens[1]  # unequal token counts: the case that needs global normalization
    assert any(np.abs(g).max() > 0 for g in full.values())
    policy = [n for n in full if n.startswith("policy.")]
    assert policy and all(("lora_" in n) == bool(lora_r) for n in policy)


@pytest.fixture(scope="module")
def served_lm(ray_cluster, tiny_paths):
    ray = ray_cluster
    from rlhf_ray.llm.serve import deploy
    from rlhf_ray.storage.weights import WeightStore

    name = f"lmws-{uuid.uuid4().hex[:6]}"
    store = ray.remote(WeightStore).options(name=name, num_cpus=0).remote()
    app = f"lmrm-test-{uuid.uuid4().hex[:6]}"
    handle = deploy(tiny_paths, app_name=app, weight_store=name,
                    namespace=ray.get_runtime_context().namespace,
                    serve_cfg=RewardServeConfig(num_cpus=0.25, max_batch_size=16,
                                                batch_wait_timeout_s=0.05))
    yield ray, store, handle, app
    from ray import serve

    serve.delete(app)
    ray.kill(store)


def test_lm_reward_model_batches_and_swaps_weights(served_lm, tiny_paths):
    ray, store, handle, _ = served_lm
    prompts = tiny.prompts(12, seed=1)
    responses = [f"good {p.split()[-2]}" for p in prompts]
    calls = [handle.score.remote(prompts[:i], responses[:i]) for i in range(1, 13)]
    results = [c.result() for c in calls]
    for i, r in enumerate(results, 1):  # each caller gets its own rows back
        assert len(r["scores"]) == i
        assert np.allclose(r["scores"], results[-1]["scores"][:i], atol=1e-5)
    assert max(handle.info.remote().result()["batch_sizes"]) > 1
    # publish new weights: same replica, new version, other scores
    from rlhf_ray.llm.modeling import load_scalar_model, state_dict_cpu

    m = load_scalar_model(tiny_paths)
    w = state_dict_cpu(m)
    key = [k for k in w if k.startswith("score")][0]
    w[key] = w[key] + 1.0
    pid = handle.info.remote().result()["pid"]
    before = handle.score.remote(prompts, responses).result()
    ray.get(store.publish.remote(5, w))
    after = handle.score.remote(prompts, responses).result()
    assert after["version"] == 5 and before["version"] == 0
    assert not np.allclose(after["scores"], before["scores"])
    assert handle.info.remote().result()["pid"] == pid


def test_lm_reward_model_over_http(served_lm, serve_http):
    _, _, _, app = served_lm
    host, port = serve_http  # where this cluster's proxy listens (8000 unless taken)

    def post(path: str, body: bytes):
        req = urllib.request.Request(f"http://{host}:{port}/{app}{path}", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, body = post("/score", json.dumps({"prompts": ["write about the fox :"] * 2,
                                              "responses": ["good fox", "bad"]}).encode())
    assert status == 200 and len(body["scores"]) == 2 and "version" in body
    status, body = post("/score", json.dumps({"prompts": ["a"], "responses": []}).encode())
    assert status == 422 and "1 prompts but 0 responses" in body["error"]
    status, _ = post("/score", b"{nope")
    assert status == 422


def test_lm_reward_model_app_from_a_folder(ray_cluster, tiny_paths):
    """`serve deploy serve/lm_reward_model.yaml`: the config validates with Serve's schema and
    its builder serves a reward-model folder as it is."""
    import yaml
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from rlhf_ray.llm.serve import app_builder

    conf = yaml.safe_load(open("serve/lm_reward_model.yaml"))
    ServeDeploySchema.model_validate(conf)
    args = dict(conf["applications"][0]["args"], model=tiny_paths, num_cpus=0.25)
    handle = serve.run(app_builder(args), name="lmrm-folder", route_prefix="/lmrm-folder")
    try:
        res = handle.score.remote(["write about the fox :"], ["good fox"]).result()
        assert res["version"] == 0 and len(res["scores"]) == 1
    finally:
        serve.delete("lmrm-folder")
