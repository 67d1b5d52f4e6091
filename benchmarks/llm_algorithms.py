"""PPO against the critic-free estimators on one task, side by side: for each seed, one SFT
model and one reward model (`rlhf-ray sft`, `rlhf-ray rm`), then the PPO stage per algorithm
from both (`rlhf-ray ppo`: the reward model fixed, so only the estimator differs), all with
the same responses per iteration (PPO: `rollout` prompts x 1; the group estimators:
`rollout / K` prompts x K).

Reported per algorithm and seed: the yardstick's gain over the SFT model on held-out prompts
(the yardstick is never the training signal: the preset's oracle, while PPO trains on the
reward model), the final KL, the learner's median seconds per step and its peak memory, and the
reward-KL frontier (the KL and the yardstick at each evaluation), and where the task has
held-out human-written text the alignment tax (its perplexity under the final policy and under
the SFT model: PPO against PPO-ptx); over
seeds, each algorithm's mean gain with a t interval, and its paired difference from PPO's
(same seed, same SFT and reward model) with a t interval. A finished run is read back from its
run folder, so the script can be stopped and run again.

    python benchmarks/llm_algorithms.py --seeds 0 1 2          # llm-tiny-smoke, 5 algorithms
    python benchmarks/llm_algorithms.py --preset llm-tiny --iterations 40 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import code_version, machine, versions, write  # noqa: E402

K = 4  # responses per prompt for the group estimators
PTX_COEF = 0.5  # PPO-ptx's gamma, on a token-mean NLL beside a token-mean policy loss
ALGORITHMS = {  # name: overrides (with the rollout's prompts set per run)
    "ppo": ["ppo.advantage_estimator=gae"],
    # InstructGPT's PPO-ptx: the pretraining NLL of the task's human-written text mixed in
    "ppo_ptx": ["ppo.advantage_estimator=gae", f"ppo.ptx_coef={PTX_COEF}"],
    "grpo": ["ppo.advantage_estimator=grpo", f"ppo.samples_per_prompt={K}",
             "ppo.kl.placement=loss", "ppo.kl.estimator=k3"],
    "dr_grpo": ["ppo.advantage_estimator=dr_grpo", f"ppo.samples_per_prompt={K}",
                "ppo.kl.placement=loss", "ppo.kl.estimator=k3"],
    "rloo": ["ppo.advantage_estimator=rloo", f"ppo.samples_per_prompt={K}"],
    "reinforce_pp": ["ppo.advantage_estimator=reinforce_pp"],
    "reinforce_pp_baseline": ["ppo.advantage_estimator=reinforce_pp_baseline",
                              f"ppo.samples_per_prompt={K}"],
    "dpo": [],  # `rlhf-ray dpo` on the pairs the reward model was fitted to: no RM calls at all
}


def sh(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def stages(preset: str, seed: int, runs: Path, common: list[str]) -> Path:
    """The seed's SFT model and first reward model (stages 1 and 2), once."""
    run = runs / f"{preset}-s{seed}-stages"
    if not (run / "sft" / "model.safetensors").exists():
        sh(["rlhf-ray", "sft", preset, f"seed={seed}", "--run-dir", str(run), *common])
    if not (run / "reward_model" / "model.safetensors").exists():
        sh(["rlhf-ray", "rm", preset, f"seed={seed}", "--run-dir", str(run),
            f"model.sft_path={run / 'sft'}", *common])
    return run


def ppo_run(preset: str, seed: int, algo: str, base: Path, runs: Path, rollout: int,
            common: list[str]) -> Path:
    run = runs / f"{preset}-s{seed}-{algo}"
    if algo == "dpo":
        if not (run / "dpo.json").exists():
            sh(["rlhf-ray", "dpo", preset, f"seed={seed}", "--run-dir", str(run),
                f"model.sft_path={base / 'sft'}", *common])
        return run
    if (run / "final" / "controller.json").exists():
        return run
    k = K if f"ppo.samples_per_prompt={K}" in ALGORITHMS[algo] else 1
    sh(["rlhf-ray", "ppo", preset, f"seed={seed}", "--run-dir", str(run),
        f"model.sft_path={base / 'sft'}", f"model.reward_path={base / 'reward_model'}",
        f"ppo.rollout_batch_size={rollout // k}", *ALGORITHMS[algo], *common])
    return run


def summarize(run: Path) -> dict:
    if (run / "dpo.json").exists():  # DPO: one evaluation, no sampling during training
        d = json.loads((run / "dpo.json").read_text())
        return {"run": str(run), "sft_score": d["sft_eval_score_mean"],
                "final_score": d["dpo_eval_score_mean"], "gain": d["eval_score_gain"],
                "dpo_seconds": d["seconds"], "dpo_val_reward_accuracy": d["val_reward_accuracy"],
                "frontier": []}
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r for r in rows if r.get("eval_score_mean") is not None]
    res = json.loads((run / "resources.json").read_text())
    learner = sorted(r["learner_s"] for r in rows)
    return {"run": str(run), "iterations": len(rows),
            "sft_score": evals[-1]["sft_eval_score_mean"],
            "final_score": evals[-1]["eval_score_mean"],
            "gain": evals[-1]["eval_score_mean"] - evals[-1]["sft_eval_score_mean"],
            "kl_final": rows[-1]["kl_mean"], "learner_s_median": learner[len(learner) // 2],
            "learner_peak_rss_mb": res["peak_rss_mb"].get("learner_0"),
            "ppo_wall_s": res["ppo_wall_s"],
            "text_ppl": evals[-1].get("eval_text_ppl"),
            "sft_text_ppl": evals[-1].get("sft_eval_text_ppl"),
            # the reward-KL frontier: (the rollout's KL to the SFT model, the held-out
            # yardstick) at each evaluation, as the DPO paper draws it
            "frontier": [[r["iteration"], r["kl_mean"], r["eval_score_mean"]] for r in evals]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llm-tiny-smoke")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    ap.add_argument("--rollout", type=int, default=64, help="responses per iteration")
    ap.add_argument("--iterations", type=int, default=None, help="run.iterations (preset's)")
    ap.add_argument("--runs", default="runs/bench-algorithms")
    ap.add_argument("--out", default="docs/results/llm_algorithms.json")
    args = ap.parse_args()
    common = [f"run.iterations={args.iterations}"] if args.iterations else []
    runs = Path(args.runs)
    rows: dict[str, dict[int, dict]] = {a: {} for a in args.algorithms}
    for seed in args.seeds:
        base = stages(args.preset, seed, runs, common)
        for algo in args.algorithms:
            done = "dpo.json" if algo == "dpo" else "final"
            fresh = not (runs / f"{args.preset}-s{seed}-{algo}" / done).exists()
            s = summarize(ppo_run(args.preset, seed, algo, base, runs, args.rollout, common))
            s.update(code=code_version() if fresh else "read back from its run folder",
                     machine=machine())
            rows[algo][seed] = s
            if algo == "dpo":
                print(f"{algo:22s} seed {seed}: gain {s['gain']:+.3f} | "
                      f"{s['dpo_seconds']:.0f} s", flush=True)
                continue
            print(f"{algo:22s} seed {seed}: gain {s['gain']:+.3f} | KL {s['kl_final']:.2f} | "
                  f"learner {s['learner_s_median']:.2f} s/step | learner peak "
                  f"{s['learner_peak_rss_mb']} MiB", flush=True)
    from rlhf_ray.core.stats import mean_ci

    summary = {}
    for algo, per in rows.items():
        gains = [per[s]["gain"] for s in args.seeds]
        entry = {"gain": mean_ci(gains) if len(gains) > 1 else {"mean": gains[0]}}
        if all(per[s].get("text_ppl") for s in args.seeds):  # the alignment tax
            entry["text_ppl_minus_sft"] = mean_ci([per[s]["text_ppl"] - per[s]["sft_text_ppl"]
                                                   for s in args.seeds]) \
                if len(args.seeds) > 1 else {"mean": per[args.seeds[0]]["text_ppl"]
                                             - per[args.seeds[0]]["sft_text_ppl"]}
        if algo != "dpo":
            entry.update(
                learner_s_median=statistics.median(per[s]["learner_s_median"]
                                                   for s in args.seeds),
                learner_peak_rss_mb=statistics.median(per[s]["learner_peak_rss_mb"] or 0
                                                      for s in args.seeds))
        if algo != "ppo" and "ppo" in rows and len(args.seeds) > 1:
            entry["gain_minus_ppo"] = mean_ci([per[s]["gain"] - rows["ppo"][s]["gain"]
                                               for s in args.seeds])
        summary[algo] = entry
        print(f"{algo:22s} gain {entry['gain']['mean']:+.3f} "
              f"{entry['gain'].get('ci95', '')} | minus PPO "
              f"{entry.get('gain_minus_ppo', {}).get('mean', float('nan')):+.3f} "
              f"{entry.get('gain_minus_ppo', {}).get('ci95', '')}", flush=True)
    out = {"preset": args.preset, "rollout_responses": args.rollout, "group_size": K,
           "iterations": args.iterations, "algorithms": {a: ALGORITHMS[a] for a in rows},
           "runs": {a: {str(s): v for s, v in per.items()} for a, per in rows.items()},
           "summary": summary,
           **versions([v for per in rows.values() for v in per.values()]),
           "note": "gain: the yardstick (the preset's oracle, never the training signal) on "
                   "held-out prompts, final policy minus SFT; t intervals over seeds; "
                   "gain_minus_ppo paired by seed (same SFT and first reward model)"}
    write(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
