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


CRITIC_FREE = {"advantage_estimator": "reinforce_pp", "loss_agg": "seq-mean-token-mean",
               "kl": {"placement": "loss", "estimator": "k3"}}


@pytest.mark.parametrize("lora_r,top,tokens,extra", [(0, None, None, {}), (4, 1, 14, {}),
                                                     (0, None, None, CRITIC_FREE)])
def test_two_learners_with_half_batches_match_one_with_the_whole(ray_cluster, tiny_paths, lora_r,
                                                                 top, tokens, extra):
    """Global advantage whitening and global token normalization make DDP over 2 gloo
    ranks compute the gradients of the whole batch, though the ranks' token counts differ;
    also when the policy trains LoRA adapters (peft) on its top block, its reference is itself
    with adapters off, the frozen block's output is cached for the epochs, and micro batches
    sized by tokens give the two ranks different numbers of forward passes; and with no
    critic (REINFORCE++: returns whitened over both ranks), a per-response loss aggregation
    (normalized by the responses of both ranks) and the KL as a loss term."""
    ray = ray_cluster
    from rlhf_ray.core.lm_ppo import micro_batches
    from rlhf_ray.llm.learner import PPOLearner
    from rlhf_ray.llm.modeling import make_batch

    batch = _rollout(tiny_paths, 8)
    ppo = PPOConfig(rollout_batch_size=8, minibatch_size=8, micro_batch_size=2,
                    micro_batch_tokens=tokens, entropy_coef=0.01, **extra).model_dump()
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
    assert any(n.startswith("critic.") for n in full) == (not extra)


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


def test_held_out_evaluations_draw_the_same_samples_each_time(served_lm, tiny_paths, tmp_path):
    """Every held-out evaluation samples with one seed, so the SFT model's and a policy's are
    paired: the same weights evaluated twice, with training calls between, give the same
    samples (and a training call draws others)."""
    from rlhf_ray.config import load_config
    from rlhf_ray.llm.evaluation import HeldOut
    from rlhf_ray.llm.generation import HFGenerationWorker

    _, _, handle, _ = served_lm
    cfg = load_config("llm-tiny-smoke", ["eval.num_prompts=8"])
    held = HeldOut(cfg, tmp_path)
    gen = HFGenerationWorker(tiny_paths, {"max_new_tokens": 6}, seed=0)
    first = [s["response"] for s in held.evaluate(gen, handle)[2]]
    training = gen.generate(held.prompts)["texts"]
    again = [s["response"] for s in held.evaluate(gen, handle)[2]]
    assert again == first
    assert training != first


def test_reward_normalization_is_measured_again_for_a_new_reward_model(served_lm, tiny_paths):
    """SFT samples' raw scores set the normalization; a batch scored by a newer reward model
    has it measured again on that version (batch and SFT samples in one call), so the SFT
    samples score 0 on average under every version."""
    from rlhf_ray.llm.modeling import load_scalar_model, state_dict_cpu
    from rlhf_ray.llm.normalization import ScoreNormalizer

    ray, store, handle, _ = served_lm
    sft_prompts = tiny.prompts(16, seed=5)
    sft_texts = [f"good {p.split()[-1]} and bad" if i % 2 else "bad" for i, p in
                 enumerate(sft_prompts)]
    first = handle.score.remote(sft_prompts, sft_texts).result()
    norm = ScoreNormalizer(enabled=True, clip=None)
    norm.calibrate(sft_prompts, sft_texts, [True] * len(sft_texts), np.asarray(first["scores"]),
                   first["version"])
    batch_p, batch_t = tiny.prompts(4, seed=6), ["good", "bad", "fine", "good good"]
    scored, scores = norm.score(handle, batch_p, batch_t)
    assert norm.remeasured == 0 and scored["version"] == first["version"]
    assert np.allclose(scores, (np.asarray(scored["scores"]) - norm.mean) / norm.std)

    w = state_dict_cpu(load_scalar_model(tiny_paths))
    key = [k for k in w if k.startswith("score")][0]
    w[key] = w[key] * 3.0 + 0.5  # another offset and scale
    new_version = first["version"] + 7
    ray.get(store.publish.remote(new_version, w))
    scored, scores = norm.score(handle, batch_p, batch_t)
    assert norm.remeasured == 1 and norm.version == scored["version"] == new_version
    sft_now = np.asarray(handle.score.remote(sft_prompts, sft_texts).result()["scores"])
    assert norm.normalize(sft_now).mean() == pytest.approx(0.0, abs=1e-4)
    assert np.allclose(scores, norm.normalize(np.asarray(scored["scores"])))


def test_a_truncated_response_is_scored_as_unfinished(served_lm, serve_http):
    """The same text scores differently when the policy never ended it (no EOS appended),
    through the handle and over HTTP (`finished`), and a malformed flag list is refused."""
    _, _, handle, app = served_lm
    prompts, texts = tiny.prompts(2, seed=9), ["good fox", "good fox"]
    both = handle.score.remote(prompts[:1] * 2, texts, finished=[True, False]).result()
    assert both["scores"][0] != pytest.approx(both["scores"][1], abs=1e-6)
    default = handle.score.remote(prompts[:1], texts[:1]).result()
    assert default["scores"][0] == pytest.approx(both["scores"][0], abs=1e-5)
    host, port = serve_http
    url = f"http://{host}:{port}/{app}/score"
    body = {"prompts": prompts[:1] * 2, "responses": texts, "finished": [True, False]}
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert np.allclose(json.loads(r.read())["scores"], both["scores"], atol=1e-5)
    bad = urllib.request.Request(url, json.dumps({**body, "finished": [True]}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=60)
    assert err.value.code == 422 and b"finished must be" in err.value.read()
