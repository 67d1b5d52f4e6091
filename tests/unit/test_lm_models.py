"""LLM workload pieces without Ray: batches and masks, log-probs under padding, the grouped
ranking loss, the tiny task's oracle, the HF generation worker's weight sync, the reward
trainer, data files and config errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.core.bradley_terry import grouped_preference_loss, ranking_loss
from rlhf_ray.errors import ConfigError
from rlhf_ray.llm import tiny
from rlhf_ray.llm.modeling import (
    encode_pairs,
    load_policy,
    load_tokenizer,
    make_batch,
    response_logprobs,
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny.build_model(path, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    return str(path)


def test_make_batch_layout_and_masks():
    b = make_batch([[5, 6], [7]], [[8, 9, 2], [10]], pad_id=0)
    assert b.prompt_len == 2
    assert b.input_ids.tolist() == [[5, 6, 8, 9, 2], [0, 7, 10, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    # positions count real tokens only: left padding does not shift the prompt
    assert b.position_ids[1, 1:3].tolist() == [0, 1]
    assert b.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="empty response"):
        make_batch([[1]], [[]], pad_id=0)


def test_logprobs_do_not_depend_on_padding(tiny_model):
    """The same (prompt, response) gives the same token log-probs alone and in a batch
    where it is left and right padded: masks and positions are right."""
    tok = load_tokenizer(tiny_model)
    model = load_policy(tiny_model).eval()
    alone = encode_pairs(tok, ["write about the fox :"], ["good fox"], 16, 8)
    padded = encode_pairs(tok, ["write about the fox :", "the fox :"],
                          ["good fox", "very happy warm bright fox"], 16, 8)
    with torch.no_grad():
        a = response_logprobs(model, alone.input_ids, alone.attention_mask, alone.position_ids,
                              alone.prompt_len)
        # the second row has a shorter prompt (left padded) and a longer response
        p = response_logprobs(model, padded.input_ids, padded.attention_mask,
                              padded.position_ids, padded.prompt_len)
    n = int(alone.response_mask.sum())
    assert padded.response_mask[0].sum() == n
    torch.testing.assert_close(p[0, :n], a[0, :n], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        b2 = encode_pairs(tok, ["the fox :"], ["very happy warm bright fox"], 16, 8)
        q = response_logprobs(model, b2.input_ids, b2.attention_mask, b2.position_ids,
                              b2.prompt_len)
    m = int(b2.response_mask.sum())
    torch.testing.assert_close(p[1, :m], q[0, :m], atol=1e-5, rtol=1e-5)


def test_grouped_loss_equals_ranking_loss_for_full_rankings():
    g = torch.Generator().manual_seed(0)
    b, k = 3, 4
    rewards = torch.randn(b, k, generator=g)
    order = torch.stack([torch.randperm(k, generator=g) for _ in range(b)])
    left, right, group = [], [], []
    for n in range(b):
        for i, j in itertools.combinations(range(k), 2):  # order[i] is ranked above order[j]
            left.append(n * k + int(order[n, i]))
            right.append(n * k + int(order[n, j]))
            group.append(n)
    mu = torch.ones(len(left))
    got = grouped_preference_loss(rewards.reshape(-1), torch.tensor(left), torch.tensor(right),
                                  mu, torch.tensor(group))
    torch.testing.assert_close(got, ranking_loss(rewards, order))
    # a tie (mu = 0.5) between equal rewards costs log 2, whatever the group sizes
    tie = grouped_preference_loss(torch.zeros(2), torch.tensor([0]), torch.tensor([1]),
                                  torch.tensor([0.5]), torch.tensor([0]))
    assert abs(float(tie) - np.log(2)) < 1e-6


def test_trimmed_micro_batches_leave_experience_and_gradients_unchanged(tiny_model):
    """Micro batches sized by a token budget and trimmed to their own padding give the same
    experience (old and reference log-probs, values) and the same minibatch gradient as one
    micro batch holding every row: only memory and time change."""
    from rlhf_ray.llm.config import PPOConfig
    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.learner import PPOLearner

    w = HFGenerationWorker(tiny_model, {"max_new_tokens": 6}, seed=0)
    prompts = [("the fox : " * (1 + i % 4)).strip() for i in range(8)]  # prompts of 4 lengths
    out = w.generate(prompts, n=1, seed=0)
    shard = {"prompt_ids": out["prompt_ids"],
             "response_ids": [r[:1 + (i * 5) % 6] for i, r in enumerate(out["response_ids"])],
             "scores": np.random.default_rng(0).normal(size=8).astype(np.float32)}
    runs = {}
    for name, extra in {"one": {"micro_batch_size": 8}, "rows": {"micro_batch_size": 3},
                        "tokens": {"micro_batch_tokens": 24}}.items():
        ppo = PPOConfig(rollout_batch_size=8, minibatch_size=8, **extra).model_dump()
        lr = PPOLearner(0, 1, tiny_model, tiny_model, ppo, pad_id=0)
        b = lr._batch(shard)
        plan = lr._micro_batches(b, np.arange(8))
        exp = lr._experience(b, torch.as_tensor(shard["scores"]), 0.1)
        runs[name] = (plan, exp, lr.gradients(shard, 0.1))
    plan = runs["tokens"][0]
    assert len(plan) > 2 and len({len(m) for m in plan}) > 1
    for name in ("rows", "tokens"):
        # what lies past a response's end is never read
        mask = make_batch(shard["prompt_ids"], shard["response_ids"], 0).response_mask.bool()
        for k in ("old_lp", "ref_lp", "values", "adv", "returns"):
            torch.testing.assert_close(getattr(runs[name][1], k)[mask], getattr(runs["one"][1], k)[mask],
                                       atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
        for k, g in runs["one"][2].items():
            np.testing.assert_allclose(runs[name][2][k], g, rtol=1e-4, atol=1e-6, err_msg=k)
    assert any(np.abs(g).max() > 0 for g in runs["one"][2].values())


def test_generation_logprobs_are_the_learners_old_logprobs(tiny_model):
    """The sampler's token log-probs (from the logits it sampled with, at its temperature)
    equal the learner's forward pass over the same tokens, so PPO's experience is the same
    with them, one forward pass fewer; also when a batch is generated in several calls."""
    from rlhf_ray.llm.config import PPOConfig
    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.learner import PPOLearner

    # 3 sequences per generate call: the 6 rows come from 2 calls (memory bound)
    w = HFGenerationWorker(tiny_model, {"max_new_tokens": 6, "temperature": 0.7,
                                        "max_batch_size": 3}, seed=0)
    prompts = ["the fox :", "write about the fox :"]
    out = w.generate(prompts, n=3, seed=1, logprobs=True)
    assert out["prompts"] == [prompts[0]] * 3 + [prompts[1]] * 3
    assert out["prompt_ids"] == [w.encode_prompts([q])[0] for q in out["prompts"]]
    assert [len(x) for x in out["logprobs"]] == [len(r) for r in out["response_ids"]]
    assert all(v < 0 for x in out["logprobs"] for v in x)
    ppo = PPOConfig(rollout_batch_size=6, minibatch_size=6, micro_batch_size=4).model_dump()
    lr = PPOLearner(0, 1, tiny_model, tiny_model, ppo, temperature=0.7,
                    pad_id=w.tok.pad_token_id)
    b = lr._batch(out)
    scores = torch.linspace(-1, 1, 6)
    mine = lr._experience(b, scores, 0.1)
    given = lr._experience(b, scores, 0.1, out["logprobs"])
    mask = b.response_mask.bool()
    assert int(mask.sum()) == sum(len(r) for r in out["response_ids"])
    for k in ("old_lp", "kl", "rewards", "adv", "returns"):
        torch.testing.assert_close(getattr(given, k)[mask], getattr(mine, k)[mask], atol=2e-5, rtol=1e-4,
                                   msg=lambda m, k=k: f"{k}: {m}")
    assert "logprobs" not in w.generate(["the fox :"], n=1, seed=1)


def test_sentiment_oracle_by_hand():
    assert tiny.sentiment_oracle("write about the fox :", "good happy fox") == pytest.approx(2 / 3 + 0.5)
    assert tiny.sentiment_oracle("write about the fox :", "bad dog") == pytest.approx(-0.5)
    assert tiny.sentiment_oracle("write about the fox :", "") == -1.0


def test_generation_worker_weight_sync_changes_outputs(tiny_model):
    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.modeling import state_dict_cpu

    w = HFGenerationWorker(tiny_model, {"max_new_tokens": 6}, seed=0)
    prompts = ["write about the fox :", "write about the owl :"]
    a = w.generate(prompts, n=3, seed=123)
    assert len(a["response_ids"]) == 6 and a["version"] == 0
    eos = w.tok.eos_token_id
    for r in a["response_ids"]:  # cut at EOS, nothing after it
        assert 1 <= len(r) <= 6 and (eos not in r or r.index(eos) == len(r) - 1)
    assert w.generate(prompts, n=3, seed=123)["response_ids"] == a["response_ids"]
    # new weights: the same seed now gives other samples, and the version moves
    weights = state_dict_cpu(w.model)
    torch.manual_seed(1)
    new = {k: v + 0.5 * torch.randn_like(v) if v.dtype.is_floating_point else v
           for k, v in weights.items()}
    assert w.update_weights(1, new) == 1
    b = w.generate(prompts, n=3, seed=123)
    assert b["version"] == 1 and b["response_ids"] != a["response_ids"]
    assert w.update_weights(1, weights) == 1  # a stale or repeated version is ignored
    assert w.generate(prompts, n=3, seed=123)["response_ids"] == b["response_ids"]


def test_reward_trainer_learns_oracle_rankings(tiny_model):
    from rlhf_ray.llm.config import RewardModelConfig
    from rlhf_ray.llm.reward_trainer import LMRewardTrainer, rankings_to_comparisons

    rng = np.random.default_rng(0)
    rankings = []
    for p in tiny.prompts(160, seed=3):
        resp = [tiny.demonstration(p, rng) for _ in range(4)]
        resp.sort(key=lambda r: -tiny.sentiment_oracle(p, r))
        rankings.append({"prompt": p, "responses": resp})
    t = LMRewardTrainer(tiny_model, RewardModelConfig(lr=3e-3, batch_size=16, val_fraction=0.25))
    t.add(rankings_to_comparisons(rankings))
    before = t.accuracy(val=True)
    stats = t.train(epochs=12)
    assert stats["rm_version"] == 1
    assert stats["rm_val_accuracy"] > 0.75 and stats["rm_val_accuracy"] > before + 0.1


def test_ranked_responses_cut_at_the_limit_stay_cut_for_the_reward_trainer(tiny_model, tmp_path,
                                                                          monkeypatch):
    """A ranking's responses keep whether the policy ended them: in the store, after a
    reopen, in the comparisons the trainer gets live or from the store, and in what it
    encodes (no EOS after a cut one). A store written before the flag existed reads as
    ended, and compaction keeps its rows."""
    import itertools

    import pyarrow as pa

    from rlhf_ray.feedback.queries import TextRankings
    from rlhf_ray.llm import reward_trainer as rt
    from rlhf_ray.llm.config import RewardModelConfig
    from rlhf_ray.storage.store import Label, PreferenceStore, QueryRecord

    store = PreferenceStore(str(tmp_path / "store"))
    kind = TextRankings()
    ids = (f"id{i}" for i in itertools.count())
    (q,) = kind.new_queries(store, (["the fox"], [["is good", "is bad and", "sad"]],
                                    [[True, False, True]]), 0, lambda: next(ids))
    assert store.texts(q.item_ids)[q.item_ids[1]] == ("the fox", "is bad and", False)
    (again,) = kind.reopen(store, [q])
    assert again.payload == q.payload == ("the fox", ["is good", "is bad and", "sad"],
                                          [True, False, True])
    with pytest.raises(ValueError, match="one flag per response"):
        kind.new_queries(store, (["x"], [["a", "b"]], [[True]]), 0, lambda: next(ids))
    store._write("texts", pa.table({"text_id": ["old"], "prompt": ["p"], "response": ["r"]}))
    assert store.texts(["old"])["old"] == ("p", "r", True)  # written before the column
    store.compact(min_age_s=0)
    assert store.texts(["old", q.item_ids[1]]) == {"old": ("p", "r", True),
                                                   q.item_ids[1]: ("the fox", "is bad and",
                                                                   False)}
    # the ranking answered (best first: 0, 2, 1): live and from the store, the same pairs
    a, b, c = q.item_ids
    labels = [Label(f"{q.query_id}-{n}", x, y, "left", "human:a", 0.0, 1.0, 0, q.query_id)
              for n, (x, y) in enumerate([(a, c), (a, b), (c, b)])]
    store.write_queries([QueryRecord(q.query_id, "ranking", list(q.item_ids), 0.0, 0)])
    store.append_labels(labels)
    (pairs,) = list(kind.stored_pages(store, 100))
    live = kind.comparisons([(lab, q) for lab in labels])
    assert [(x["left_finished"], x["right_finished"]) for x in pairs] == \
        [(True, True), (True, False), (True, False)]
    assert [{k: x[k] for k in ("left", "right", "left_finished", "right_finished")}
            for x in live] == [{k: x[k] for k in ("left", "right", "left_finished",
                                                  "right_finished")} for x in pairs]
    seen = []
    real = rt.encode_pairs
    monkeypatch.setattr(rt, "encode_pairs", lambda *a, **k: seen.append(k["finished"])
                        or real(*a, **k))
    t = rt.LMRewardTrainer(tiny_model, RewardModelConfig(val_fraction=0.0))
    t.add(pairs)
    t.accuracy(val=False)
    assert seen and seen[-1] == [True, True, False]  # is good, sad, is bad and (cut: no EOS)


def test_fixed_length_answers_count_as_finished_and_truncation_is_still_counted():
    from rlhf_ray.llm.workers import end_flags

    assert end_flags([True, False, False], False) == ([True, False, False], [False, True, True])
    assert end_flags([True, False, False], True) == ([True, True, True], [False, True, True])
    with pytest.raises(ConfigError, match="ppo.missing_eos_penalty: no response misses"):
        load_config("smollm2-reviews", ["ppo.missing_eos_penalty=1"])
    assert load_config("smollm2-reviews").generation.fixed_length  # Ziegler's continuations
    assert not load_config("llm-tiny").generation.fixed_length


def test_soft_labels_count_by_the_side_they_favour(tiny_model):
    """Accuracy with soft labels (the raters' agreement, e.g. mu = 0.9) is the accuracy of
    the side each favours: the same as with hard labels (it once compared pred == mu and
    counted every soft pair wrong)."""
    from rlhf_ray.llm.config import RewardModelConfig
    from rlhf_ray.llm.reward_trainer import LMRewardTrainer

    prompts = tiny.prompts(40, seed=5)
    pairs = [{"prompt": p, "left": f"good {p.split()[-2]}", "right": "bad sad", "mu": 1.0,
              "ranking_id": f"r{i}"} for i, p in enumerate(prompts)]
    t = LMRewardTrainer(tiny_model, RewardModelConfig(val_fraction=0.5))
    t.add(pairs)
    hard = t.accuracy(val=True)
    t.replace([{**c, "mu": 0.9} if i % 2 else {**c, "left": c["right"], "right": c["left"],
                                                "mu": 0.1} for i, c in enumerate(pairs)])
    assert t.accuracy(val=True) == hard and 0 < hard < 1


def test_preference_files_and_errors(tmp_path):
    from rlhf_ray.llm.data import load_preferences, read_rows

    p = tmp_path / "prefs.jsonl"
    p.write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}) + "\n"
                 + json.dumps({"prompt": "y", "responses": ["a", "b", "c"]}) + "\n")
    assert load_preferences(str(p)) == [{"prompt": "x", "responses": ["a", "b"]},
                                        {"prompt": "y", "responses": ["a", "b", "c"]}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match="missing column"):
        read_rows(str(bad), ["prompt"], "data.prompts_path")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{oops\n')
        read_rows(str(tmp_path / "broken.jsonl"), ["prompt"], "data.prompts_path")


def test_llm_config_errors_name_the_field():
    cfg = load_config("llm-tiny")
    assert cfg.workload == "llm" and cfg.ppo.kl.controller == "adaptive"
    with pytest.raises(ConfigError, match="ppo.micro_batch_size=5"):
        load_config("llm-tiny", ["ppo.micro_batch_size=5"])
    with pytest.raises(ConfigError, match="ppo.kl.estimator"):
        load_config("llm-tiny", ["ppo.kl.estimator=k9"])
    with pytest.raises(ConfigError, match="placement.num_learners"):
        load_config("llm-tiny", ["placement.num_learners=3"])


def test_pretraining_text_is_split_and_ptx_without_it_is_refused(tmp_path):
    from rlhf_ray.llm.data import pretrain_texts

    with pytest.raises(ConfigError, match="ppo.ptx_coef=0.5: needs a pretraining mix"):
        load_config("llm-tiny", ["ppo.ptx_coef=0.5"])
    assert pretrain_texts(load_config("llm-tiny")) is None  # no text: no alignment tax
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(f"text number {i}" for i in range(10)) + "\n\n")
    cfg = load_config("llm-tiny", [f"data.pretrain_path={txt}", "ppo.ptx_coef=0.5"])
    assert pretrain_texts(cfg) == [f"text number {i}" for i in range(8)]
    assert pretrain_texts(cfg, "eval") == ["text number 8", "text number 9"]  # held out
    rows = tmp_path / "corpus.jsonl"
    rows.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(3)))
    with pytest.raises(ValueError, match="3 texts; needs 5 or more"):
        pretrain_texts(load_config("llm-tiny", [f"data.pretrain_path={rows}"]))
    reviews = load_config("smollm2-reviews-smoke")  # its sft split mixed in, eval held out
    from rlhf_ray.llm.reviews import task

    t = task(reviews.data.reviews)
    assert set(pretrain_texts(reviews, "eval")) == {s.text for s in t.parts["eval"]}
    assert not set(pretrain_texts(reviews)) & set(pretrain_texts(reviews, "eval"))


def test_stage_commands_reject_a_control_config(capsys):
    from rlhf_ray.cli import main

    assert main(["ppo", "hopper-smoke"]) == 2
    assert "is a stage of the llm workload" in capsys.readouterr().err


def test_checkpoint_of_another_format_is_refused_clearly(tmp_path):
    from rlhf_ray.llm.loop import LLMController

    ctl = LLMController(load_config("llm-tiny-smoke"), str(tmp_path / "run"), progress=False)
    ck = tmp_path / "run" / "checkpoints" / "iter_000002"
    ck.mkdir(parents=True)
    (ck / "controller.json").write_text(json.dumps({"format": 99, "workload": "llm"}))
    assert ctl.folder.latest_checkpoint() == str(ck)
    with pytest.raises(ValueError, match="format 99 .* reads format 1"):
        ctl.load_state(ck)
    (ck / "controller.json").write_text("{truncated")
    with pytest.raises(ValueError, match="unreadable controller.json"):
        ctl.load_state(ck)


def test_sft_trains_in_train_mode_so_gradient_checkpointing_recomputes(tiny_model):
    """transformers checkpoints only in train mode: with `model.gradient_checkpointing` the
    SFT model's blocks must run again in the backward pass."""
    from rlhf_ray.llm.modeling import decoder_layers
    from rlhf_ray.llm.sft import trainable_policy

    cfg = load_config("llm-tiny-smoke", ["model.gradient_checkpointing=true"])
    model = trainable_policy(cfg, tiny_model, "cpu")
    assert model.training
    calls = []
    mlp = decoder_layers(model)[1][0].mlp
    forward = mlp.forward

    def counted(*a, **kw):  # (a recomputation runs no module hooks: count the calls)
        calls.append(1)
        return forward(*a, **kw)

    mlp.forward = counted
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == 2, "the block ran once: nothing was recomputed in backward"


def test_a_response_standing_as_eos_has_the_log_prob_of_eos():
    """A first sampled token equal to the pad token leaves an empty response, which stands as
    EOS: its old log-prob must be EOS's, not the pad's that was sampled."""
    from rlhf_ray.llm.generation import response_logprobs_from_steps

    pad, eos = 0, 2
    step0 = torch.tensor([[3.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 4.0]])
    step1 = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0]])
    resp = [[eos], [3, 1]]  # row 0 sampled the pad (logit 3) first, row 1 tokens 3 then 1
    got = response_logprobs_from_steps([step0, step1], resp, temperature=2.0)
    lsm0, lsm1 = (torch.log_softmax(x / 2.0, -1) for x in (step0, step1))
    assert got[0] == pytest.approx([float(lsm0[0, eos])])
    assert got[0][0] != pytest.approx(float(lsm0[0, pad]))
    assert got[1] == pytest.approx([float(lsm0[1, 3]), float(lsm1[1, 1])])


def test_a_response_cut_at_the_length_limit_gets_no_eos_for_the_reward_model(tiny_model):
    tok = load_tokenizer(tiny_model)
    b = encode_pairs(tok, ["a b", "a b"], ["good fox", "good fox"], 8, 16,
                     finished=[True, False])
    ends = [b.input_ids[i, b.prompt_len:][b.response_mask[i].bool()].tolist() for i in range(2)]
    assert ends[0][-1] == tok.eos_token_id and ends[1][-1] != tok.eos_token_id
    assert ends[0][:-1] == ends[1]  # the same text, only the ending differs


def test_a_critic_free_learner_builds_no_critic_and_at_beta_0_no_reference(tiny_model, tmp_path):
    """GRPO (`ppo.advantage_estimator=grpo`) with beta fixed at 0: no critic (model,
    optimizer, value loss, checkpoint folder) and no reference model; every token of a
    response carries its score standardized within its group (K = 2 here), and a PPO step
    moves the policy."""
    from rlhf_ray.core.advantages import shape_scores
    from rlhf_ray.llm.config import PPOConfig
    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.learner import PPOLearner

    out = HFGenerationWorker(tiny_model, {"max_new_tokens": 5}, seed=0).generate(
        tiny.prompts(4, seed=1), n=2, seed=0)
    raw = torch.tensor([1.0, 3.0, 0.5, 0.5, -2.0, 2.0, 0.0, 4.0])
    shard = {"prompt_ids": out["prompt_ids"], "response_ids": out["response_ids"],
             "scores": shape_scores("grpo", raw, 2).numpy()}
    free = PPOConfig(rollout_batch_size=4, samples_per_prompt=2, minibatch_size=8,
                     advantage_estimator="grpo", kl={"controller": "fixed", "init_coef": 0.0})
    lr = PPOLearner(0, 1, tiny_model, tiny_model, free.model_dump(), pad_id=0,
                    max_new_tokens=5)
    assert lr.critic is None and lr.critic_opt is None and lr.ref is None
    assert lr.agg == "seq-mean-token-mean"
    gae = PPOLearner(0, 1, tiny_model, tiny_model, PPOConfig().model_dump(), pad_id=0)
    held = [sum(p.numel() for m in (x.policy, x.critic, x.ref) if m is not None
                for p in m.parameters()) for x in (lr, gae)]
    assert held[1] > 2.9 * held[0]  # the policy alone, against policy, critic and reference
    b = lr._batch(shard)
    exp = lr._experience(b, torch.as_tensor(shard["scores"]), 0.0)
    mask = b.response_mask.bool()
    want = torch.tensor([-1, 1, 0, 0, -1, 1, -1, 1]) / np.sqrt(2)  # (r - mean) / std, K = 2
    for i in range(8):
        assert torch.allclose(exp.adv[i][mask[i]], want[i].float(), atol=1e-4)
    torch.testing.assert_close(exp.ref_lp, exp.old_lp)  # no reference: the KL is 0
    before = {k: v.clone() for k, v in lr.policy.state_dict().items()}
    stats = lr.step(shard, 0.0)
    assert "vf_loss" not in stats and stats["kl_mean"] == 0 and stats["policy_version"] == 1
    assert any(not torch.equal(before[k], v) for k, v in lr.policy.state_dict().items())
    saved = lr.save(str(tmp_path / "ckpt"))
    assert set(saved) == {"policy"} and not (tmp_path / "ckpt" / "critic").exists()
    assert "critic_opt" not in torch.load(tmp_path / "ckpt" / "optimizer.pt")
    again = PPOLearner(0, 1, tiny_model, tiny_model, free.model_dump(), pad_id=0,
                       state_path=str(tmp_path / "ckpt" / "optimizer.pt"))
    assert again.version == 1  # a critic-free checkpoint resumes
