"""The LLM workload end to end on the session's local Ray cluster: the online loop of the
smoke preset, and the three stages run alone from files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_own_lines_only

from rlhf_ray.config import load_config
from rlhf_ray.llm.metrics import LLM
from rlhf_ray.report import report
from rlhf_ray.runtime.metrics import read_metrics
from rlhf_ray.storage.store import PreferenceStore
from rlhf_ray.train import train


def test_llm_tiny_smoke_beats_the_sft_model(ray_cluster, tmp_path):
    """The online loop; its labeler is killed (SIGKILL) after iteration 4: Ray restarts it,
    the reward trainer's data set is rebuilt from the store, and no ranking is lost. (Resume
    is the next test's, from S3.)"""
    import os
    import signal

    import ray

    from rlhf_ray.llm.loop import LLMController

    cfg = load_config("llm-tiny-smoke")
    seen = []
    ctl = LLMController(cfg, str(tmp_path / "run"), progress=False)
    groups = {}

    def kill_labeler_once(m):
        seen.append(m)
        if m["iteration"] == 4:
            os.kill(ray.get(ctl.labeler.__ray_call__.remote(lambda self: os.getpid())),
                    signal.SIGKILL)
        if m["iteration"] == 6:  # after the rebuild: every stored ranking, each once
            groups["trainer"] = ray.get(ctl.trainer.__ray_call__.remote(
                lambda self: sorted(self.groups)))
            (page,) = [ray.get(ref) for ref in ctl.labeler.stored.options(
                num_returns="streaming").remote()]  # text: every comparison in one page
            groups["store"] = sorted({c["ranking_id"] for c in page})

    ctl.on_metrics = kill_labeler_once
    ctl.run()
    run_dir = ctl.run_dir
    rows = read_metrics(run_dir)
    assert [r["labeler_restarts"] for r in rows] == [0] * 4 + [1] * (len(rows) - 4)
    assert groups["trainer"] == groups["store"] and len(groups["store"]) > cfg.labels.initial
    assert rows == seen and len(rows) == cfg.run.iterations
    for row in rows:
        missing = [k for k in LLM.required if row.get(k) is None]
        assert not missing, f"metrics lack {missing}"
        unregistered = LLM.unregistered(row)
        assert not unregistered, f"keys missing from the metrics registry: {unregistered}"
        # every sample was produced by the policy version synced after the previous step
        assert row["sample_policy_versions"] == [row["policy_version"] - 1]
    # the oracle score rises clearly over the SFT model's (the yardstick, never trained on)
    sft = rows[0]["sft_oracle_score_mean"]
    late = np.mean([r["oracle_score_mean"] for r in rows[-3:]])
    assert late > sft + 0.2, f"oracle score {late:.3f} vs SFT {sft:.3f}"
    assert 0 < rows[-1]["kl_mean"] < 5 * cfg.ppo.kl.target
    # preference collection went on during PPO; every ranking is in the store as C(K,2) pairs
    k = cfg.labels.responses_per_query
    rankings = cfg.labels.initial + cfg.labels.per_iteration * (cfg.run.iterations - 1)
    assert rows[0]["labels_total"] >= cfg.labels.initial
    assert rows[-1]["labels_total"] >= rankings - cfg.labels.per_iteration
    table = PreferenceStore(str(run_dir / "preferences")).labels()
    asked = json.loads((run_dir / "final" / "controller.json").read_text())["labels_requested"]
    assert len(table) == asked * k * (k - 1) // 2  # every ranking asked for is in the store
    assert rows[-1]["rm_val_accuracy"] > 0.6
    # models are Hugging Face folders with safetensors; controller state keeps beta
    for sub in ("sft", "reward_model", "final/policy", "final/critic", "final/reward_model"):
        assert (run_dir / sub / "model.safetensors").exists(), sub
    state = json.loads((run_dir / "final" / "controller.json").read_text())
    assert state["kl_controller"]["kind"] == "adaptive"
    assert abs(state["kl_controller"]["beta"] - rows[-1]["kl_coef_next"]) < 1e-5
    assert report(str(run_dir)).endswith("report.png")



TINY = ["data.num_sft_examples=256", "data.num_prompts=128", "sft.epochs=1",
        "labels.initial=16", "labels.per_iteration=2", "reward_model.initial_epochs=2",
        "ppo.rollout_batch_size=16", "ppo.ppo_epochs=2", "run.iterations=2"]


def test_a_run_on_s3_resumed_by_another_job_sees_its_stored_labels(ray_cluster, s3, tmp_path):
    """`rlhf-ray train llm-tiny-smoke --run-dir s3://...` (PPO with LoRA, generation on a
    vLLM engine that follows the learner by adapters), then `rlhf-ray
    train --resume s3://...` from another working dir with another cache (another node, as far as the run
    can tell), on a real S3-protocol server: the SFT model, the reward model and every
    checkpoint are written by the roles straight to the bucket and read back from it; the
    resumed run reopens the same preference store and counts every ranking in it (the LLM
    controller once made up a new run name on resume and opened an empty store). Both
    commands print only their own lines; Ray's, RLlib's and Serve's go to the run's
    driver.log; nothing is written under either job's working dir."""
    import os
    import subprocess
    import sys

    from rlhf_ray.storage import locations

    run = s3("llm") + "/r1"
    store_root = run + "/preferences"
    base = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    cli = [sys.executable, "-m", "rlhf_ray.cli", "train"]

    def job(i: int):
        (tmp_path / f"job{i}").mkdir()
        return dict(cwd=str(tmp_path / f"job{i}"), capture_output=True, text=True, timeout=600,
                    env=dict(base, RLHF_RAY_CACHE=str(tmp_path / f"cache{i}")))

    def log_tail() -> str:
        log = run + "/driver.log"
        return locations.read_text(log)[-3000:] if locations.exists(log) else ""

    # PPO with LoRA adapters (as the real-model presets train): the resume rebuilds the
    # learner's and the vLLM engine's policy from the final checkpoint's adapters; the
    # learner's log-probs are compared with the engine's (sampler_kl). Critic-free (RLOO,
    # two responses per prompt): no critic in the checkpoints, and each iteration's ranking
    # queries are its rollout's groups (pairs), not samples drawn again
    first = subprocess.run([*cli, "llm-tiny-smoke", "--run-dir", run, *TINY, "model.lora.r=4",
                            "generation.backend=vllm", "ppo.old_logprobs=learner",
                            "ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=2",
                            "ppo.rollout_batch_size=8", "labels.responses_per_query=2"],
                           **job(1))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:] + log_tail()
    assert_own_lines_only(first, run)
    assert f"run folder: {run}" in first.stderr and f"done: {run}" in first.stdout
    rows = read_metrics(run)
    stored = PreferenceStore(store_root).labels()
    # K = 2: every query is one pair (no ranking id), one label
    assert len(set(stored.column("query_id").to_pylist())) == rows[-1]["labels_total"] > 0
    for sub in ("sft", "reward_model", "final/policy", "final/reward_model"):
        assert locations.is_file(f"{run}/{sub}/model.safetensors"), sub
    assert locations.is_file(f"{run}/final/policy_adapter/adapter_config.json")
    assert not locations.exists(f"{run}/final/critic")
    assert all(r["vf_loss"] is None for r in rows)
    assert [r["queries_from_rollout"] for r in rows] == [2, 2]
    assert os.listdir(tmp_path / "job1") == []

    again = subprocess.run([*cli, "--resume", run, "run.iterations=3"], **job(2))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:] + log_tail()
    assert_own_lines_only(again, run)
    assert os.listdir(tmp_path / "job2") == []
    more = read_metrics(run)
    assert [r["iteration"] for r in more] == [1, 2, 3]
    # policy version, beta and the SFT model's evaluation carry on from the final checkpoint
    assert more[2]["policy_version"] == 3
    assert more[2]["sample_policy_versions"] == [2]  # the workers loaded the checkpoint's policy
    # ... the engine sampled from the checkpoint's adapters: its log-probs are the learner's
    assert all(r["sampler_kl"] < 1e-4 for r in more) and more[2]["generation_startup_s"] > 0
    assert abs(more[2]["kl_coef"] - rows[-1]["kl_coef_next"]) < 1e-5
    assert more[2]["sft_oracle_score_mean"] == rows[-1]["sft_oracle_score_mean"]
    # the resumed labeler opened the same store: every earlier ranking counts, new ones join
    assert more[2]["labels_total"] == rows[-1]["labels_total"] + 2
    assert more[2]["queries_from_rollout"] == 2
    after = set(PreferenceStore(store_root).labels().column("query_id").to_pylist())
    assert set(stored.column("query_id").to_pylist()) < after


def test_stages_run_alone_from_files(ray_cluster, tmp_path):
    """`sft`, then `rm` from a chosen/rejected file, then `ppo` from both folders."""
    from rlhf_ray.llm import tiny

    base = ["data.num_sft_examples=256", "sft.epochs=1", "reward_model.initial_epochs=2",
            "run.iterations=2", "ppo.rollout_batch_size=16"]
    sft_dir = train(load_config("llm-tiny-smoke", base), run_dir=str(tmp_path / "a"),
                    stages="sft", progress=False)
    sft_path = str(sft_dir / "sft")
    prefs = tiny.preference_file(tmp_path / "prefs.jsonl", 48, seed=5)
    rm_dir = train(load_config("llm-tiny-smoke", base + [f"model.sft_path={sft_path}",
                                                         f"data.preferences_path={prefs}"]),
                   run_dir=str(tmp_path / "b"), stages="rm", progress=False)
    assert (rm_dir / "reward_model" / "model.safetensors").exists()
    assert not (rm_dir / "sft").exists()  # started from the given SFT model
    # DPO from the same SFT model (`train` with mode=dpo): no reward model; no preference
    # file, so the labeler (the oracle) ranks SFT samples into the run's store, and DPO
    # fits those; the SFT and DPO models judged on the same held-out prompts with the same
    # draws
    dpo_cfg = load_config("llm-tiny-smoke", base + [
        f"model.sft_path={sft_path}", "mode=dpo", "labels.initial=24", "dpo.lr=0.001",
        "eval.num_prompts=32"])
    dpo_dir = train(dpo_cfg, run_dir=str(tmp_path / "e"), progress=False)
    res = json.loads((dpo_dir / "dpo.json").read_text())
    k = dpo_cfg.labels.responses_per_query
    stored = PreferenceStore(str(dpo_dir / "preferences")).labels()
    assert len(set(stored.column("ranking_id").to_pylist())) == 24  # rankings of K
    assert res["pairs"] + res["val_pairs"] == len(stored) == 24 * k * (k - 1) // 2
    assert (dpo_dir / "dpo" / "model.safetensors").exists() and res["pairs"] > 0
    assert all(np.isfinite(res[f"{t}_eval_score_mean"]) for t in ("sft", "dpo"))
    assert res["eval_score_gain"] == res["dpo_eval_score_mean"] - res["sft_eval_score_mean"]
    assert "eval_rm_score_mean" not in res and not (dpo_dir / "reward_model").exists()
    sft_samples, dpo_samples = ([json.loads(x) for x in (dpo_dir / f"samples_{t}.jsonl")
                                 .read_text().splitlines()] for t in ("sft", "dpo"))
    assert [x["prompt"] for x in sft_samples] == [x["prompt"] for x in dpo_samples]
    # the roles of this stage share one placement group (STRICT_PACK: one node), and the
    # generation worker (a vLLM engine) is killed (SIGKILL) after the first iteration: Ray
    # restarts it, the controller gives it the current policy and asks again
    import os
    import signal

    import ray

    from rlhf_ray.llm.loop import LLMController

    ctl = LLMController(load_config("llm-tiny-smoke", base + [
        f"model.sft_path={sft_path}", f"model.reward_path={rm_dir / 'reward_model'}",
        "placement.group_strategy=STRICT_PACK", "run.run_name=packed",
        "generation.backend=vllm", "ppo.old_logprobs=learner"]),
        str(tmp_path / "c"), progress=False)
    pids = []

    def kill_generation_worker(m):
        pids.append(ray.get(ctl.gens[0].__ray_call__.remote(lambda self: os.getpid())))
        if m["iteration"] == 1:
            os.kill(pids[0], signal.SIGKILL)

    ctl.on_metrics = kill_generation_worker
    ctl.run("ppo")
    ppo_dir = ctl.run_dir
    from ray.util import placement_group_table

    groups = [g for g in placement_group_table().values() if g["name"].startswith("rlhf-llm-")]
    assert [g["strategy"] for g in groups] == ["STRICT_PACK"]
    assert groups[0]["state"] == "REMOVED"  # given back at the end
    rows = read_metrics(ppo_dir)
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert pids[0] != pids[1] and rows[-1]["generation_restarts"] == 1  # a new process ...
    assert rows[-1]["sample_policy_versions"] == [1]  # ... that sampled with the synced policy
    assert all(r["sampler_kl"] < 1e-4 for r in rows)  # (the learner's own log-probs)
    assert all(r["labels_total"] == 0 for r in rows)  # a fixed reward model: no labeling
    assert (ppo_dir / "final" / "policy" / "model.safetensors").exists()
    # ppo.async_generation: the next batch is sampled while the learner steps, one step
    # off-policy, and the rows say so; the learner's old log-probs are a version ahead of the
    # sampler's, and truncated importance sampling corrects for it. This run is also a
    # user's own: prompts from a file, no built-in task, no oracle and no yardstick (nothing
    # of the toy task it did not ask for)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in tiny.prompts(40, 7)))
    corpus = tmp_path / "corpus.txt"  # its own text: PPO-ptx's mix and the alignment tax's
    corpus.write_text("\n".join(tiny.prompts(50, 11)) + "\n")
    own = load_config("llm-tiny-smoke", base + [
        f"model.sft_path={sft_path}", f"model.reward_path={rm_dir / 'reward_model'}",
        "ppo.async_generation=true", "ppo.old_logprobs=learner",
        "ppo.importance_sampling_cap=2", "run.iterations=3", "eval.every=2", "data.task=null",
        "labeler.oracle=null", f"data.prompts_path={prompts}", "labels.per_iteration=0",
        # GRPO (4 responses per prompt), its KL as a k3 loss term
        "ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4", "ppo.rollout_batch_size=4",
        "ppo.kl.placement=loss", "ppo.kl.estimator=k3",
        f"data.pretrain_path={corpus}", "ppo.ptx_coef=0.5"])
    d = train(own, run_dir=str(tmp_path / "d"), stages="ppo", progress=False)
    rows = read_metrics(d)
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    assert [r["sample_policy_versions"] for r in rows] == [[0], [0], [1]]
    assert [r["policy_lag"] for r in rows] == [0, 1, 1]
    assert rows[0]["sampler_kl"] < 1e-4 < rows[1]["sampler_kl"]  # on-policy, then one behind
    assert all(0 < r["sampler_is_weight_mean"] <= 2 for r in rows)
    assert all(r["kl_loss"] is not None and r["vf_loss"] is None for r in rows)
    assert all(r.get("oracle_score_mean") is None for r in rows)  # no judge it did not name
    evals = [r for r in rows if r.get("eval_rm_score_mean") is not None]
    assert [r["iteration"] for r in evals] == [2, 3]
    assert all(r.get("eval_score_mean") is None for r in evals)
    assert all(r["ptx_loss"] > 0 for r in rows)  # PPO-ptx, and the alignment tax measured
    assert all(r["eval_text_ppl"] > 1 and r["sft_eval_text_ppl"] > 1 for r in evals)
    assert evals[-1]["eval_text_ppl"] != evals[-1]["sft_eval_text_ppl"]
    assert Path(report(str(d))).stat().st_size > 10_000


def test_a_placement_group_that_cannot_fit_is_refused_clearly(ray_cluster, tmp_path):
    """STRICT_SPREAD needs one node per role; the session's cluster has one node."""
    cfg = load_config("llm-tiny-smoke", ["placement.group_strategy=STRICT_SPREAD",
                                         "placement.group_timeout_s=3"])
    with pytest.raises(RuntimeError, match="placement.group_strategy=STRICT_SPREAD"):
        train(cfg, run_dir=str(tmp_path / "r"), progress=False)
