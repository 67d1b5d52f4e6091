"""RLHF from synthetic labels vs PPO on the true reward, over seeds, with intervals.

For each env: RLlib PPO on the true reward, and this loop at each label budget (and, with
`--ablations`, the paper's ablations at 700 labels: uniform queries instead of the ensemble's
disagreement, one predictor instead of an ensemble, no 10% random-response term), each over
`--seeds`. Every (env, variant, seed) is one run, kept in the JSON record as soon as it ends:
run the script again and only what is missing runs, so a grid of many hours is finished a
part at a time. With `--checkpoint-every N` a run the script was stopped in goes on from its
last checkpoint (the record names it under `in_progress`): a Pong run of several hours can
span sittings.

Per run: the final policy's true return on fresh episodes (`run.final_eval_episodes`, actions
at the policy's mean; RUN/final_eval.json), the area under the learning curve (mean true
episode return over the iterations), env steps per second, and the machine's load while it
ran. Per env and variant: each seed's value, the mean, and the return ratio RLHF / true reward
over a random policy's return (`(RLHF - random) / (true reward - random)`: 1 is the true
reward's return, 0 a random policy's; a plain ratio means nothing where returns are negative,
as on Reacher) with Fieller's 95% interval (the two variants' seeds independent; it holds
its coverage at 5 seeds, where a percentile bootstrap's covers about 88%), and the probability
that a run of the variant beats a true-reward run. The random policy's return is measured
once per env (uniform actions, the preset's env settings, 10 episodes) and kept in the record.
Over envs, per variant: the interquartile mean of the normalized final return (each run on the
same scale) and rliable's probability of improvement, with stratified BCa intervals that
resample the true-reward runs too (rlhf_ray.core.stats). Every run keeps the code version
(git commit) and the machine it ran on; a record whose runs ran different code says so.
Throughput ratios count only runs that had the machine to themselves (`alone`: mean 1-minute
load under cores + 0.5 while it ran; the record keeps the load), and compare runs of one
sitting (machine and day) only: absolute speed moves by 2-3x between days.

    python benchmarks/control.py --envs Hopper-v5 HalfCheetah-v5 Ant-v5 Reacher-v5 \\
        --labels 350 700 1400 --seeds 0 1 2 3 4 --steps 500000 --tag control_grid
    python benchmarks/control.py --envs Hopper-v5 --ablations --seeds 0 1 2 --tag control_ablations
    python benchmarks/control.py --recompute docs/results/control_grid.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path
from record import code_version, machine, versions  # noqa: E402

PRESETS = {"Hopper-v5": "hopper", "HalfCheetah-v5": "halfcheetah", "Ant-v5": "ant",
           "Reacher-v5": "reacher", "ALE/Pong-v5": "pong"}
TRUE = "true reward"
# a run had the machine alone when the mean 1-minute load while it ran stayed under the
# cores + this: a 2-core run loads this machine to 1.1-1.5 by itself, and a test suite beside
# it brought Hopper's rate from about 1,730 to 1,520 steps/s at a load of 2.5
ALONE_LOAD = 0.5
ABLATIONS = {  # the paper's, at 700 labels (Christiano et al. 2017, section 3.3)
    "RLHF 700 uniform queries": ["labels.budget=700", "labels.query_selection=uniform"],
    "RLHF 700 no ensemble": ["labels.budget=700", "reward_model.ensemble_size=1",
                             "labels.query_selection=uniform"],
    "RLHF 700 no random-response term": ["labels.budget=700",
                                         "reward_model.random_response_prob=0"],
}


class LoadSampler:
    """The 1-minute load average every `every` seconds while a run goes on."""

    def __init__(self, every: float = 15.0):
        self.every, self.values, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.values.append(os.getloadavg()[0])

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_one(preset: str, overrides: list[str], run_dir: str | None = None,
            resume: bool = False) -> dict:
    """One run to its end. `resume`: continue `run_dir` from its last checkpoint (a run the
    script was stopped in); its rows are then the whole run's, from its metrics file, and it
    never counts as alone (its first part's load went unrecorded)."""
    from rlhf_ray.config import load_config
    from rlhf_ray.runtime.metrics import read_metrics
    from rlhf_ray.train import train

    cfg = load_config(preset, overrides)
    t0 = time.time()
    with LoadSampler() as load:
        run_dir = train(cfg, run_dir=run_dir, resume=resume, progress=False)
    wall = time.time() - t0
    # the whole run's rows: a resume already moved the rows after its checkpoint aside
    # (RunDir.truncate_metrics), so an iteration done again appears once
    rows = read_metrics(run_dir)
    final_eval = Path(run_dir) / "final_eval.json"
    cpus = os.cpu_count() or 1
    mean_load = statistics.fmean(load.values) if load.values else os.getloadavg()[0]
    return {"run_dir": str(run_dir), "rows": rows, "wall_s": wall, "resumed": resume,
            "final_eval": json.loads(final_eval.read_text()) if final_eval.exists() else None,
            "load_mean": mean_load, "load_max": max(load.values, default=mean_load),
            "alone": mean_load < cpus + ALONE_LOAD and not resume}


def start_run(entry: dict, preset: str, variant: str, seed: int, root: Path) -> tuple[str, bool]:
    """(run folder, resume?) for one (variant, seed) of an env's record entry: the run this
    script was stopped in, where it left a checkpoint to go on from, else a new folder under
    `root`; named in the entry's `in_progress` until it ends."""
    started = entry.setdefault("in_progress", {}).setdefault(variant, {})
    run_dir = started.get(str(seed))
    # a complete checkpoint, as RunDir.latest_checkpoint counts one: its controller.json is
    # written last (a checkpoint cut short by the stop has the policy but not the rest)
    if run_dir and any(Path(run_dir, "checkpoints").glob("iter_*/controller.json")):
        return run_dir, True
    run_dir = str(root / f"bench-{preset}-{variant.replace(' ', '_')}-s{seed}-{int(time.time())}")
    started[str(seed)] = run_dir
    return run_dir, False


def end_run(entry: dict, variant: str, seed: int) -> None:
    started = entry["in_progress"][variant]
    del started[str(seed)]
    if not started:
        del entry["in_progress"][variant]
    if not entry["in_progress"]:
        del entry["in_progress"]


def random_return(preset: str, overrides: list[str] | None = None, episodes: int = 10,
                  seed: int = 12345) -> dict:
    """A uniformly random policy's true return in the preset's env (its time limit and
    termination settings; `overrides` may name another env): the floor of the normalized
    scores."""
    from rlhf_ray.config import load_config
    from rlhf_ray.control.envs import make_env

    cfg = load_config(preset, overrides or [])
    env = make_env({**cfg.env.model_dump(), "_rlhf_info": False})
    env.action_space.seed(seed)
    returns = []
    try:
        for i in range(episodes):
            env.reset(seed=seed + i)
            total, done = 0.0, False
            while not done:
                _, r, term, trunc, _ = env.step(env.action_space.sample())
                total += float(r)
                done = term or trunc
            returns.append(total)
    finally:
        env.close()
    return {"episodes": episodes, "returns": returns, "mean": statistics.fmean(returns)}


def sittings(rows: list[dict]) -> list[float]:
    """Each sitting's training seconds: a resumed run's clock starts again at 0, so the rows
    kept from one process end where the next one's time falls back."""
    spans = []
    for a, b in zip(rows, rows[1:] + [None]):
        if b is None or b["time_s"] <= a["time_s"]:
            spans.append(a["time_s"])
    return spans


def summarize(res: dict, window: int) -> dict:
    rows = res["rows"]
    rets = [r["true_return_mean"] for r in rows if r.get("true_return_mean") is not None]
    # consecutive rows of one process (a resumed run's clock starts again at 0)
    pairs = [(b["env_steps"] - a["env_steps"], b["time_s"] - a["time_s"])
             for a, b in zip(rows, rows[1:]) if b["time_s"] > a["time_s"]]
    secs = sum(t for _, t in pairs)
    sps = sum(n for n, _ in pairs) / secs if secs > 0 else float("nan")
    fe = res.get("final_eval") or {}
    spans = sittings(rows) if rows else []
    sampled, rm = fe.get("sampled") or {}, fe.get("rm") or {}
    return {"final_return": fe.get("return_mean", float("nan")),
            "final_eval_episodes": fe.get("episodes", 0),
            # why the final policy's mean actions may do worse than its samples: the same
            # number of episodes with sampled actions, the policy's action noise, and the
            # reward model's predicted return of the mean-action episodes against the true
            "sampled_return": sampled.get("return_mean"),
            "action_std": fe.get("action_std_mean"),
            "sampled_action_std": sampled.get("action_std_mean"),
            "rm_pred_return": rm.get("pred_return_mean"),
            "rm_corr_episodes": rm.get("corr_episodes"),
            "rm_corr_steps": rm.get("corr_steps"),
            "sampled_rm_corr_steps": (sampled.get("rm") or {}).get("corr_steps"),
            "final_window_return": statistics.fmean(rets[-window:]) if rets else float("nan"),
            "auc_return": statistics.fmean(rets) if rets else float("nan"),
            "env_steps_per_s": sps,
            # the whole run's training time over its sittings (iterations done again after a
            # restart counted once): a resumed run's wall_s is its last sitting's only
            "train_s": sum(spans),
            "sittings": len(spans),
            "labels_total": rows[-1].get("labels_total", 0) if rows else 0,
            "rm_val_accuracy": rows[-1].get("rm_val_accuracy") if rows else None}


STANDARDIZED = "true reward, standardized"


def variants(labels: list[int], ablations: bool, standardized: bool = False) -> dict[str, list[str]]:
    out = {TRUE: ["run.reward=env"]}
    if standardized:  # the same reward normalization as the reward model's output
        out[STANDARDIZED] = ["run.reward=env_standardized"]
    out.update({f"RLHF {n} labels": [f"labels.budget={n}"] for n in labels})
    if ablations:
        out.update(ABLATIONS)
    return out


def sitting(run: dict) -> str:
    """Which sitting (machine and day) a run had: throughput compares only within one, since
    absolute speed moves by 2-3x between machines and days. Runs from before the record kept
    it: the UTC day of the timestamp that ends their run folder's name."""
    if run.get("sitting"):
        return run["sitting"]
    stamp = str(run.get("run_dir", "")).rsplit("-", 1)[-1]
    return time.strftime("%Y-%m-%d", time.gmtime(int(stamp))) if stamp.isdigit() else "?"


def throughput(variant: dict, base: dict) -> dict:
    """RLHF env steps/s over plain PPO's, from runs that had the machine alone, within each
    sitting that has both; the mean of those ratios, and each sitting's."""
    def by_sitting(seeds: dict) -> dict:
        out: dict = {}
        for r in seeds.values():
            if r.get("alone"):
                out.setdefault(sitting(r), []).append(r["env_steps_per_s"])
        return out

    v, b = by_sitting(variant), by_sitting(base)
    pairs = [{"sitting": k, "runs": [len(v[k]), len(b[k])],
              "ratio": statistics.fmean(v[k]) / statistics.fmean(b[k])} for k in sorted(v) if k in b]
    return {"throughput_ratio": statistics.fmean(p["ratio"] for p in pairs) if pairs else None,
            "throughput_runs_alone": [sum(p["runs"][0] for p in pairs),
                                      sum(p["runs"][1] for p in pairs)],
            "throughput_sittings": pairs}


def env_summary(runs: dict[str, dict], floor: float = 0.0) -> dict:
    """Per variant: seeds' values, means with t intervals, ratios to the true reward over
    `floor` (the random policy's return) with Fieller's interval, and the probability that
    a run of the variant beats a run on the true reward."""
    from rlhf_ray.core.stats import mean_ci, probability_of_improvement, ratio_ci

    def values(variant: str, key: str) -> list[float]:
        return [r[key] for _, r in sorted(runs.get(variant, {}).items(), key=lambda kv: int(kv[0]))]

    base = values(TRUE, "final_return")
    base_auc = values(TRUE, "auc_return")
    # a ratio over the floor needs a baseline clearly above it: where the true reward's
    # interval reaches the random return (Ant at 500k steps) the denominator is about 0; a
    # single seed (Pong) has no interval: it clears when it is above the floor
    cleared = (mean_ci(base)["ci95"][0] > floor if len(base) > 1
               else len(base) == 1 and base[0] > floor)
    out = {}
    for variant, seeds in runs.items():
        fin, auc = values(variant, "final_return"), values(variant, "auc_return")
        row = {"seeds": sorted(int(s) for s in seeds), "final_return": fin,
               "final_return_mean": mean_ci(fin), "auc_return": auc,
               "auc_return_mean": mean_ci(auc)}
        if variant != TRUE and base:
            row["baseline_above_floor"] = cleared
            row["return_ratio"] = ratio_ci(fin, base, floor=floor)
            row["auc_ratio"] = ratio_ci(auc, base_auc, floor=floor)
            row["prob_improvement"] = probability_of_improvement([fin], [base])
            row.update(throughput(seeds, runs.get(TRUE, {})))
        std = values(STANDARDIZED, "final_return")
        if variant not in (TRUE, STANDARDIZED) and len(std) > 1:  # the same normalization
            row["return_ratio_vs_standardized"] = ratio_ci(fin, std, floor=floor)
        out[variant] = row
    return out


def aggregate(record: dict) -> dict:
    """Per RLHF variant, over envs: IQM of final returns normalized per env ((run - random)
    / (true-reward mean - random)), with a stratified BCa interval that resamples the
    true-reward runs too; and the probability of improvement over the true reward (rliable's:
    a run of the variant above a run on the true reward, averaged over envs)."""
    from rlhf_ray.core.stats import iqm_ci, probability_of_improvement

    out = {}
    envs = record["envs"]
    names = {v for e in envs.values() for v in e["runs"] if v != TRUE}
    for variant in sorted(names):
        # the grid's seed count: the most seeds this variant or its baseline has in any env
        # (so at least this env's baseline); an env with fewer waits for the IQM
        full = max(len(e["runs"].get(k, {})) for e in envs.values() for k in (TRUE, variant)
                   if variant in e["runs"])
        per_env, bases, floors, left_out, incomplete = [], [], [], [], []
        for env, e in envs.items():
            base = [r["final_return"] for r in e["runs"].get(TRUE, {}).values()]
            runs = e["runs"].get(variant)
            if not base or not runs:
                continue
            if not e.get("summary", {}).get(variant, {}).get("baseline_above_floor", True):
                left_out.append(env)  # normalizing by about 0 would swamp the other envs
                continue
            if len(runs) < full:
                incomplete.append(env)  # a grid part-way through: its seeds come later
                continue
            floors.append(e.get("random_return", {}).get("mean", 0.0))
            per_env.append([r["final_return"] for r in runs.values()])
            bases.append(base)
        if per_env:
            out[variant] = {"envs": len(per_env),
                            **iqm_ci(per_env, baselines=bases, floors=floors),
                            "prob_improvement": probability_of_improvement(per_env, bases),
                            "left_out_baseline_not_above_random": left_out,
                            "left_out_incomplete": incomplete}
    return out


def ci(d: dict, key: str, fmt: str) -> str:
    """`d[key]` with its 95% interval; without one where there is none (one seed: nan), and
    `[unbounded]` where a ratio's denominator is not clearly above the floor."""
    lo, hi = d["ci95"]
    if lo != lo:
        many = all(n > 1 for n in d.get("n", [2])) if isinstance(d.get("n"), list) else True
        span = " [unbounded]" if d.get("bounded") is False and many else ""
    else:
        span = f" [{lo:{fmt}}, {hi:{fmt}}]"
    return f"{d[key]:{fmt}}{span}"


INTERVALS = ("95% intervals over seeds: t for means, Fieller's for ratios, stratified BCa for "
             "the IQM and the probability of improvement (true-reward runs resampled too)")


def curve_label(name: str, seeds: int, summary: dict) -> str:
    """A variant's legend entry: its seeds and, for RLHF, its return ratio with the interval."""
    label = f"{name} ({seeds} seed{'s' * (seeds != 1)})"
    if "return_ratio" in summary:
        label += f": {ci(summary['return_ratio'], 'ratio', '.2f')}"
    return label


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    envs = list(record["envs"])
    fig, axes = plt.subplots(1, len(envs), figsize=(6 * len(envs), 4.2), squeeze=False)
    colors = ["black", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:red",
              "tab:brown", "tab:olive"]
    for ax, env in zip(axes[0], envs):
        for (name, seeds), color in zip(record["envs"][env]["runs"].items(), colors):
            curves = [s["curve"] for s in seeds.values() if s["curve"]]
            for c in curves:  # each seed thin, the mean over seeds thick
                ax.plot([r["env_steps"] for r in c], [r["true_return_mean"] for r in c],
                        color=color, lw=0.5, alpha=0.4)
            n = min(len(c) for c in curves) if curves else 0
            if n:
                xs = [r["env_steps"] for r in curves[0][:n]]
                ys = np.mean([[r["true_return_mean"] or np.nan for r in c[:n]] for c in curves], 0)
                summary = record["envs"][env].get("summary", {}).get(name, {})
                ax.plot(xs, ys, color=color, lw=2 if name == TRUE else 1.4,
                        label=curve_label(name, len(curves), summary))
        rand = record["envs"][env].get("random_return")
        if rand:
            ax.axhline(rand["mean"], color="gray", ls=":", lw=1, label="random policy")
        ax.set_title(env)
        ax.set_xlabel("env steps")
        ax.set_ylabel("true episode return")
        ax.legend(fontsize=7)
    fig.suptitle("RLHF from synthetic labels vs PPO on the true reward\n(legend: final return "
                 "over a random policy's as a ratio [95% Fieller interval])", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _worst(run: dict, sampled: bool) -> str:
    """A run's worst final-evaluation episode: where a policy falls in some episodes."""
    fe = run.get("final_eval") or {}
    rets = (fe.get("sampled") or {}).get("returns") if sampled else fe.get("returns")
    return f"{min(rets):,.0f}" if rets else "-"


def markdown(record: dict) -> str:
    """The record as the README's tables: per env and variant, every seed's final return, the
    mean with its interval and the ratio over the random floor; then the IQM over envs."""
    lines = [f"{record['steps']:,} env steps per run; final return: the final policy on fresh "
             "episodes (mean actions); ratio: (RLHF - random) / (true reward - random); "
             f"P(better): a run above a true-reward run; {INTERVALS}.", "",
             "| env | variant | seeds | final return, mean | ratio | P(better) | each seed's "
             "final return | env steps/s vs true reward (runs alone, one sitting) |",
             "|---|---|---|---|---|---|---|---|"]
    code = record.get("code_versions")
    if code:
        lines.insert(1, "Code: " + ", ".join(f"{v} ({n} runs)" for v, n in code.items())
                     + (" -- runs of different code versions are compared here"
                        if record.get("mixed_code_versions") else "") + ".")
    for env, e in record["envs"].items():
        rand = e.get("random_return", {}).get("mean")
        if rand is not None:
            lines.append(f"| {env} | random policy | | {rand:.1f} | 0 | | | |")
        # returns in the thousands (Hopper) as whole numbers; small ones (Reacher, -10 to -4)
        # with a decimal, or its seeds would read as equal
        seen = [abs(v) for r in e.get("summary", {}).values() for v in r["final_return"]]
        fmt = ",.0f" if max(seen + [abs(rand or 0.0)]) >= 100 else ".1f"
        for name, r in e.get("summary", {}).items():
            ratio = (ci(r["return_ratio"], "ratio", ".2f") if "return_ratio" in r
                     else "1" if name == TRUE else "no true-reward runs here")
            if not r.get("baseline_above_floor", True):
                ratio = "none: true reward not above random"
            tr = r.get("throughput_ratio")
            speed = "" if tr is None else (f"{tr:.2f} ({r['throughput_runs_alone'][0]} vs "
                                            f"{r['throughput_runs_alone'][1]} runs)")
            pi = ci(r["prob_improvement"], "p", ".2f") if "prob_improvement" in r else ""
            lines.append(f"| {env} | {name} | {len(r['seeds'])} | "
                         f"{ci(r['final_return_mean'], 'mean', fmt)} | {ratio} | {pi} | "
                         f"{', '.join(f'{v:{fmt}}' for v in r['final_return'])} | {speed} |")
    if record.get("aggregate"):
        lines += ["", "| variant | envs | IQM of normalized final return over envs | "
                  "P(better than the true reward) |", "|---|---|---|---|"]
        for name, a in record["aggregate"].items():
            not_above, incomplete = (a.get("left_out_baseline_not_above_random"),
                                     a.get("left_out_incomplete"))
            note = (f" (left out: {', '.join(not_above)}, true reward not above random)"
                    if not_above else "")
            if incomplete:
                note += f" (left out until its seeds are done: {', '.join(incomplete)})"
            pi = ci(a["prob_improvement"], "p", ".2f") if "prob_improvement" in a else ""
            lines.append(f"| {name} | {a['envs']}{note} | {ci(a, 'iqm', '.2f')} | {pi} |")
    diag = [(env, name, r) for env, e in record["envs"].items()
            for name, seeds in e["runs"].items() for r in [seeds]
            if any(s.get("sampled_return") is not None for s in seeds.values())]
    if diag:
        lines += ["", "The final policy, each seed: return with mean actions / with sampled "
                  "actions; the worst episode of each; the policy's action std (mean "
                  "actions); the reward model's "
                  "predicted return of the mean-action episodes against their true return "
                  "(correlation over steps).", "",
                  "| env | variant | mean / sampled actions | worst episode, mean / sampled | "
                  "action std | RM vs true, steps |",
                  "|---|---|---|---|---|---|"]
        for env, name, seeds in diag:
            runs = [seeds[k] for k in sorted(seeds, key=int)]

            def each(key, fmt, runs=runs):
                return ", ".join("-" if r.get(key) is None else f"{r[key]:{fmt}}" for r in runs)

            pairs = ", ".join(f"{r['final_return']:,.0f} / " + (
                "-" if r.get("sampled_return") is None else f"{r['sampled_return']:,.0f}")
                for r in runs)
            worsts = ", ".join(f"{_worst(r, False)} / {_worst(r, True)}" for r in runs)
            lines.append(f"| {env} | {name} | {pairs} | {worsts} | {each('action_std', '.2f')} | "
                         f"{each('rm_corr_steps', '.2f')} |")
    return "\n".join(lines) + "\n"


def finish(record: dict, out: Path, tag: str) -> None:
    cpus = record.get("machine", {}).get("cpus") or os.cpu_count() or 1
    for e in record["envs"].values():  # the rule of today for runs kept under an older one
        for seeds in e["runs"].values():
            for r in seeds.values():
                if "load_mean" in r:
                    r["alone"] = bool(r.get("alone", True)) and r["load_mean"] < cpus + ALONE_LOAD
                if "train_s" not in r and r.get("curve"):  # a record from before it
                    spans = sittings(r["curve"])
                    r["train_s"], r["sittings"] = sum(spans), len(spans)
    for env, e in record["envs"].items():
        if "random_return" not in e:  # a record from before the floor
            preset = record.get("preset")
            e["random_return"] = random_return(preset or PRESETS[env],
                                               [f"env.id={env}"] if preset else [])
        e["summary"] = env_summary(e["runs"], e["random_return"]["mean"])
    record["aggregate"] = aggregate(record)
    record.update(versions([r for e in record["envs"].values() for seeds in e["runs"].values()
                            for r in seeds.values()]))
    json_path = out / f"{tag}.json"
    json_path.write_text(json.dumps(record, indent=1))
    plot(record, out / f"{tag}.png")
    (out / f"{tag}.md").write_text(markdown(record))
    print(f"\nfinal true return, (RLHF - random) / (true-reward PPO - random); {INTERVALS}")
    for env, e in record["envs"].items():
        print(f"{env:15s} {'random policy':34s} {e['random_return']['mean']:.1f}")
        for name, r in e["summary"].items():
            vals = " ".join(f"{v:.0f}" for v in r["final_return"])
            if name == TRUE or "return_ratio" not in r:  # no baseline to divide by
                print(f"{env:15s} {name:34s} seeds [{vals}]")
                continue
            rr, tr = r["return_ratio"], r.get("throughput_ratio")
            print(f"{env:15s} {name:34s} ratio {rr['ratio']:.3f} [{rr['ci95'][0]:.3f}, "
                  f"{rr['ci95'][1]:.3f}]  seeds [{vals}]  throughput "
                  f"{'n/a' if tr is None else f'{tr:.3f}'}")
    for name, a in record["aggregate"].items():
        print(f"IQM over {a['envs']} envs, {name:34s} {a['iqm']:.3f} [{a['ci95'][0]:.3f}, "
              f"{a['ci95'][1]:.3f}]")
    print(f"wrote {json_path} and {out / (tag + '.png')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", nargs="+", default=["Hopper-v5", "HalfCheetah-v5"],
                    help=f"env ids: {', '.join(PRESETS)} (their presets), or any other with "
                    "--preset")
    ap.add_argument("--preset", help="run every env with this preset's settings, its env id "
                    "replaced (an env no preset covers: --envs Walker2d-v5 --preset hopper)")
    ap.add_argument("--labels", nargs="+", type=int, default=[700])
    ap.add_argument("--ablations", action="store_true", help="the paper's ablations at 700 labels")
    ap.add_argument("--standardized-baseline", action="store_true",
                    help="also PPO on the true reward standardized as the reward model's output "
                    "is (run.reward=env_standardized): a gain of RLHF over the true reward that "
                    "this baseline shares is the normalization's")
    ap.add_argument("--no-true-reward", action="store_true",
                    help="skip the baseline (a record that has it already)")
    ap.add_argument("--steps", type=int, default=500_000)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                    help="a checkpoint every N iterations: a run the script is stopped in then "
                    "goes on from there the next time, instead of starting again (Pong)")
    ap.add_argument("--final-window", type=int, default=5)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--tag", default="control_grid")
    ap.add_argument("--recompute", metavar="JSON", help="only recompute summaries and plot")
    ap.add_argument("overrides", nargs="*", help="key=value applied to every run")
    args = ap.parse_args()
    if args.recompute:
        p = Path(args.recompute)
        return finish(json.loads(p.read_text()), p.parent, p.stem)
    os.environ.setdefault("MUJOCO_GL", "egl")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{args.tag}.json"
    here = f"{time.strftime('%Y-%m-%d', time.gmtime())} {machine()['node']}"  # this sitting
    code = code_version()
    record = json.loads(json_path.read_text()) if json_path.exists() else {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": args.steps,
        "overrides": args.overrides, "envs": {},
        "machine": machine()}
    record.setdefault("preset", args.preset)
    if (record["steps"] != args.steps or record["overrides"] != args.overrides
            or record["preset"] != args.preset):
        raise SystemExit(f"{json_path}: a record of {record['steps']} steps with overrides "
                         f"{record['overrides']} and preset {record['preset']}; use another "
                         "--tag for other settings")
    unknown = [e for e in args.envs if e not in PRESETS and not args.preset]
    if unknown:
        raise SystemExit(f"--envs {' '.join(unknown)}: no preset covers them; name one whose "
                         "settings they run with (--preset hopper)")
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    todo = variants(args.labels, args.ablations, args.standardized_baseline)
    if args.no_true_reward:
        todo.pop(TRUE)
    for env in args.envs:
        preset = args.preset or PRESETS[env]
        env_ov = [f"env.id={env}"] if args.preset else []
        entry = record["envs"].setdefault(env, {"runs": {}})
        if "random_return" not in entry:
            entry["random_return"] = random_return(preset, env_ov)
            json_path.write_text(json.dumps(record, indent=1))
        runs = entry["runs"]
        for name, extra in todo.items():
            for seed in args.seeds:
                if str(seed) in runs.get(name, {}):
                    continue  # done in an earlier sitting
                run_dir, resume = start_run(entry, preset, name, seed, Path("runs").resolve())
                json_path.write_text(json.dumps(record, indent=1))
                ov = [*env_ov, f"run.total_env_steps={args.steps}", f"seed={seed}",
                      f"run.checkpoint_every={args.checkpoint_every}", *extra, *args.overrides]
                res = run_one(preset, ov, run_dir=run_dir, resume=resume)
                end_run(entry, name, seed)
                s = summarize(res, args.final_window)
                keep = ("env_steps", "true_return_mean", "pred_return_mean", "labels_total",
                        "rm_val_accuracy", "time_s")
                runs.setdefault(name, {})[str(seed)] = {
                    "seed": seed, "wall_s": res["wall_s"], **s, "run_dir": res["run_dir"],
                    "load_mean": res["load_mean"], "load_max": res["load_max"],
                    "alone": res["alone"], "resumed": res["resumed"], "sitting": here,
                    "code": code, "machine": machine(),
                    "final_eval": res["final_eval"],
                    "curve": [{k: r.get(k) for k in keep} for r in res["rows"]]}
                print(f"{env:15s} {name:34s} seed {seed}: final return {s['final_return']:8.1f} "
                      f"(AUC {s['auc_return']:.1f})  steps/s {s['env_steps_per_s']:7.1f}  wall "
                      f"{res['wall_s']:.0f}s  load {res['load_mean']:.1f}", flush=True)
                json_path.write_text(json.dumps(record, indent=1))  # kept at once: resumable
    finish(record, out, args.tag)
    ray.shutdown()


if __name__ == "__main__":
    main()
