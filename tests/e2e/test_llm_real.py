"""The LLM workload on a real pretrained model and real human ratings: `rlhf-ray train
smollm2-reviews-smoke` (SmolLM2-135M-Instruct, the Rotten Tomatoes ratings, the MiniLM
yardstick) end to end on the session's Ray cluster, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import assert_own_lines_only

from rlhf_ray.config import load_config
from rlhf_ray.llm.data import load_prompts
from rlhf_ray.llm.metrics import LLM
from rlhf_ray.runtime.metrics import read_metrics
from rlhf_ray.storage.store import PreferenceStore

pytestmark = pytest.mark.e2e


def test_smollm2_reviews_smoke_runs_the_three_stages_on_the_real_model(ray_cluster, tmp_path):
    """The three stages on SmolLM2-135M with LoRA on its top blocks, generation on a vLLM
    engine (the CPU build) that follows the learner by adapters."""
    run = tmp_path / "run"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    out = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "train", "smollm2-reviews-smoke",
                          "--run-dir", str(run), "generation.backend=vllm",
                          "ppo.old_logprobs=learner"], env=env, capture_output=True, text=True,
                         timeout=900)
    log = (run / "driver.log").read_text()[-3000:] if (run / "driver.log").exists() else ""
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + log
    assert_own_lines_only(out, run)
    assert "comparisons: 24 pairs" in out.stderr and "raters disagree on" in out.stderr
    cfg = load_config("smollm2-reviews-smoke")
    rows = read_metrics(run)
    assert [r["iteration"] for r in rows] == [1, 2]
    for row in rows:
        assert not [k for k in LLM.required if row.get(k) is None], row
        assert not LLM.unregistered(row)
        assert 0 <= row["oracle_score_mean"] <= 1  # the MiniLM probe's P(positive)
        # the engine samples from the learner's policy (adapters synced each step): its
        # token log-probs are the learner's up to the kernels' difference
        assert row["sampler_kl"] < 1e-3 and row["generation_startup_s"] > 0
    last = rows[-1]
    for key in ("eval_score_mean", "eval_vader_mean", "eval_rm_score_mean",
                "sft_eval_score_mean", "sft_eval_vader_mean", "sft_eval_rm_score_mean"):
        assert last.get(key) is not None, key
    assert -1 <= last["eval_vader_mean"] <= 1 and last["rm_judge_diverging"] in (True, False)
    # held-out samples of the SFT model and the final policy, on held-out prompts only
    held = set(load_prompts(cfg, "eval"))
    for tag in ("sft", "final"):
        samples = [json.loads(x) for x in (run / f"samples_{tag}.jsonl").read_text().splitlines()]
        assert len(samples) == cfg.eval.num_prompts
        assert {s["prompt"] for s in samples} <= held
        assert all(s["response"].strip() and 0 <= s["score"] <= 1 for s in samples)
    # the reward model's data: human comparisons with the raters' agreement
    stats = json.loads((run / "reward_data.json").read_text())
    assert stats["pairs"] == 24 and 0 <= stats["rater_disagreement"] < 0.5
    # online rankings from the simulated rater during PPO, in the store
    store = PreferenceStore(str(run / "preferences"))
    labels = store.labels()
    assert len(labels) == last["labels_total"] >= 1  # K = 2: pairs, one label each
    asked = store.texts(labels.column("left_id").to_pylist())
    assert {v[0] for v in asked.values()} <= set(load_prompts(cfg, "train"))
    # the saved policy is an ordinary HF folder with the real tokenizer and chat template
    pol = run / "final" / "policy"
    assert (pol / "model.safetensors").exists() and (pol / "chat_template.jinja").exists()
    assert json.loads((pol / "config.json").read_text())["vocab_size"] == 49152
    # time and memory per role; the report's table of held-out prompts and continuations
    res = json.loads((run / "resources.json").read_text())
    assert {"generation_0", "learner_0", "reward_trainer", "controller",
            "reward_model_server", "sft_task"} <= set(res["peak_rss_mb"])
    assert 0 < res["ppo_roles_peak_rss_sum_mb"] < 12 * 1024
    from rlhf_ray.report import report

    report(str(run))
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "| yardstick |" in md and "final continuation" in md and "learner_0" in md
    # the adapters a resume rebuilds the policy from (a resume with adapters runs in
    # test_llm_smoke's S3 test, on the tiny model)
    assert (run / "final" / "policy_adapter" / "adapter_config.json").exists()


def test_the_own_model_example_runs_as_printed_on_the_real_model(ray_cluster, tmp_path,
                                                                   monkeypatch):
    """`rlhf-ray train examples/own_model.yaml` (SmolLM2-135M, the example's own files, no
    task, oracle or yardstick), cut to one short iteration: the files read, the model's chat
    template wraps the example's instruction, and a run with no judge evaluates with the
    reward model's score, saying so."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = tmp_path / "run"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    small = ["run.iterations=1", "sft.epochs=1", "reward_model.initial_epochs=1",
             "ppo.rollout_batch_size=4", "ppo.minibatch_size=4", "ppo.micro_batch_size=2",
             "ppo.ppo_epochs=1", "generation.max_new_tokens=8", "eval.num_prompts=4"]
    out = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "train",
                          "examples/own_model.yaml", *small, "--run-dir", str(run)],
                         env=env, capture_output=True, text=True, timeout=900, cwd=root)
    log = (run / "driver.log").read_text()[-3000:] if (run / "driver.log").exists() else ""
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + log
    assert "reward model from 32 rankings (data.preferences_path)" in out.stderr
    assert "no eval.yardstick or labeler.oracle" in out.stderr
    [row] = read_metrics(run)
    assert row["oracle_score_mean"] is None and row["eval_rm_score_mean"] is not None
    assert row["labels_total"] == 0  # nothing asked of a labeler
    assert (run / "final" / "policy_adapter").exists() or (run / "final" / "policy").exists()
    sft = [json.loads(line) for line in (run / "samples_sft.jsonl").read_text().splitlines()]
    asked = {r["prompt"] for r in sft}
    monkeypatch.chdir(root)
    held_out = set(load_prompts(load_config("examples/own_model.yaml"), split="eval"))
    assert asked and asked <= held_out  # evaluated on the held-out fifth of the prompts
