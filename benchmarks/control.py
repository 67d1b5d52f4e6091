"""Side-by-side benchmark: RLHF from synthetic labels vs PPO on the true reward.

On the same machine, seeds and env-step budget, for each env: RLlib PPO on the true reward,
and this loop with 350, 700 and 1400 synthetic labels. Prints, per env and label budget,
  (a) final true return of RLHF / final true return of true-reward PPO
  (b) env steps per second of the RLHF loop / of plain PPO
and writes a JSON record plus a learning-curve PNG under docs/results/.

    python benchmarks/control.py                                  # full: 1M steps, 2 envs
    python benchmarks/control.py --steps 150000 --seeds 0         # what fits in a short session

Final return = mean of the last `--final-window` iterations' true episode return.
Steps/s = env steps per second over the PPO iterations (setup and the initial labelling
phase excluded; reported separately as `wall_s`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

PRESETS = {"Hopper-v5": "hopper", "HalfCheetah-v5": "halfcheetah"}


def run_one(preset: str, overrides: list[str]) -> dict:
    from rlhf_ray.config import load_config
    from rlhf_ray.train import train

    cfg = load_config(preset, overrides)
    rows: list[dict] = []
    t0 = time.time()
    run_dir = train(cfg, on_metrics=rows.append, progress=False)
    wall = time.time() - t0
    return {"run_dir": str(run_dir), "rows": rows, "wall_s": wall}


def summarize(rows: list[dict], window: int) -> dict:
    rets = [r["true_return_mean"] for r in rows if r.get("true_return_mean") is not None]
    final = statistics.fmean(rets[-window:]) if rets else float("nan")
    if len(rows) >= 2:
        steps = rows[-1]["env_steps"] - rows[0]["env_steps"]
        secs = rows[-1]["time_s"] - rows[0]["time_s"]
        sps = steps / secs if secs > 0 else float("nan")
    else:
        sps = float("nan")
    return {"final_true_return": final, "env_steps_per_s": sps,
            "labels_total": rows[-1].get("labels_total", 0) if rows else 0,
            "rm_val_accuracy": rows[-1].get("rm_val_accuracy") if rows else None}


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(record["envs"])
    fig, axes = plt.subplots(1, len(envs), figsize=(6 * len(envs), 4.2), squeeze=False)
    for ax, env in zip(axes[0], envs):
        colors = ["black", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:red"]
        for (name, runs), color in zip(record["envs"][env]["runs"].items(), colors):
            for i, run in enumerate(runs):  # one color per variant, one line style per seed
                xs = [r["env_steps"] for r in run["curve"]]
                ys = [r["true_return_mean"] for r in run["curve"]]
                ax.plot(xs, ys, label=f"{name} (seed {run['seed']})", color=color,
                        ls=["-", "--", ":", "-."][i % 4],
                        lw=2 if name == "true reward" else 1.2)
        ax.set_title(env)
        ax.set_xlabel("env steps")
        ax.set_ylabel("true episode return")
        ax.legend(fontsize=7)
    fig.suptitle("RLHF from synthetic labels vs PPO on the true reward")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=list(PRESETS))
    ap.add_argument("--labels", nargs="+", type=int, default=[350, 700, 1400])
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--final-window", type=int, default=5)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--tag", default="control")
    ap.add_argument("--recompute", metavar="JSON", help="only recompute ratios and plot of a record")
    ap.add_argument("overrides", nargs="*", help="key=value applied to every run")
    args = ap.parse_args()
    if args.recompute:
        return recompute(args.recompute)
    os.environ.setdefault("MUJOCO_GL", "egl")

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": args.steps,
              "seeds": args.seeds, "labels": args.labels, "overrides": args.overrides,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "envs": {}}
    json_path = out / f"{args.tag}.json"
    for env in args.envs:
        preset = PRESETS[env]
        runs: dict[str, list] = {}
        variants = [("true reward", ["run.reward=env"])] + [
            (f"RLHF {n} labels", [f"labels.budget={n}"]) for n in args.labels]
        for name, extra in variants:
            for seed in args.seeds:
                ov = [f"run.total_env_steps={args.steps}", f"seed={seed}", "run.checkpoint_every=0",
                      f"run.run_name=bench-{preset}-{name.replace(' ', '_')}-s{seed}-{int(time.time())}",
                      *extra, *args.overrides]
                res = run_one(preset, ov)
                s = summarize(res["rows"], args.final_window)
                keep = ("env_steps", "true_return_mean", "pred_return_mean", "labels_total",
                        "rm_val_accuracy", "time_s")
                runs.setdefault(name, []).append({
                    "seed": seed, "wall_s": res["wall_s"], **s, "run_dir": res["run_dir"],
                    "curve": [{k: r.get(k) for k in keep} for r in res["rows"]]})
                print(f"{env:15s} {name:16s} seed {seed}: final true return {s['final_true_return']:8.1f}"
                      f"  steps/s {s['env_steps_per_s']:7.1f}  wall {res['wall_s']:.0f}s", flush=True)
                record["envs"][env] = {"runs": runs}  # partial: a cut-off run keeps what is done
                json_path.write_text(json.dumps(record, indent=1))
        record["envs"][env] = {"runs": runs, **env_ratios(runs)}
        json_path.write_text(json.dumps(record, indent=1))
    finish(record, out, args.tag)
    ray.shutdown()


def env_ratios(runs: dict[str, list]) -> dict:
    """Baseline figures and, per RLHF variant, (a) return ratio and (b) throughput ratios:
    over the PPO iterations, and end to end (setup and the initial labelling included)."""

    def mean(rs, key):
        return statistics.fmean(r[key] for r in rs)

    def end_to_end(r):
        return r["curve"][-1]["env_steps"] / r["wall_s"] if r["curve"] else float("nan")

    base = runs["true reward"]
    base_ret, base_sps = mean(base, "final_true_return"), mean(base, "env_steps_per_s")
    base_e2e = statistics.fmean(end_to_end(r) for r in base)
    ratios = {}
    for name, rs in runs.items():
        if name == "true reward":
            continue
        ret, sps = mean(rs, "final_true_return"), mean(rs, "env_steps_per_s")
        e2e = statistics.fmean(end_to_end(r) for r in rs)
        ratios[name] = {"return_ratio": ret / base_ret if base_ret else float("nan"),
                        "throughput_ratio": sps / base_sps if base_sps else float("nan"),
                        "end_to_end_throughput_ratio": e2e / base_e2e if base_e2e else float("nan"),
                        "final_true_return": ret, "env_steps_per_s": sps,
                        "end_to_end_env_steps_per_s": e2e}
    return {"baseline": {"final_true_return": base_ret, "env_steps_per_s": base_sps,
                         "end_to_end_env_steps_per_s": base_e2e}, "ratios": ratios}


def finish(record: dict, out: Path, tag: str) -> None:
    """Write the JSON and the plot, and print the ratios."""
    json_path = out / f"{tag}.json"
    json_path.write_text(json.dumps(record, indent=1))
    plot(record, out / f"{tag}.png")
    print("\n(a) final true return RLHF / true-reward PPO   (b) env steps/s RLHF / plain PPO "
          "over the PPO iterations [end to end, setup and initial labels included]")
    for env, e in record["envs"].items():
        for name, r in e["ratios"].items():
            print(f"{env:15s} {name:16s} (a) {r['return_ratio']:.3f}   (b) {r['throughput_ratio']:.3f}"
                  f" [{r['end_to_end_throughput_ratio']:.3f}]")
    print(f"wrote {json_path} and {out / (tag + '.png')}")


def recompute(path: str) -> None:
    """Recompute the ratios and the plot of an existing record (no new runs)."""
    p = Path(path)
    record = json.loads(p.read_text())
    for env, e in record["envs"].items():
        record["envs"][env] = {"runs": e["runs"], **env_ratios(e["runs"])}
    finish(record, p.parent, p.stem)


if __name__ == "__main__":
    main()
