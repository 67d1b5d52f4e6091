"""The end of a sweep: a results table, `sweep_summary.csv`, `score_vs_kl.png` (score
against KL per trial) and `best_config.yaml`, which `rlhf-ray train` accepts unchanged."""

from __future__ import annotations

import csv
from pathlib import Path

from rlhf_ray.config import dump_config
from rlhf_ray.storage import locations
from rlhf_ray.sweep.spec import SweepConfig, trial_config


def summarize(grid, sweep: SweepConfig, spec: dict, root: str | Path, metric: str,
              progress: bool = True) -> dict:
    """Console table, sweep_summary.csv, score_vs_kl.png and best_config.yaml (in the sweep
    folder, local or a URI)."""
    with locations.writable_dir(str(root)) as out:
        return _summarize(grid, sweep, spec, Path(out), metric, progress, str(root))


def _summarize(grid, sweep: SweepConfig, spec: dict, out: Path, metric: str, progress: bool,
               root: str) -> dict:
    keys = list(sweep.space)
    kl_key = "kl_mean"
    rows = []
    for res in grid:
        if res.metrics is None:
            continue
        hist = res.metrics_dataframe
        m = res.metrics
        rows.append({"trial": res.path.rsplit("/", 1)[-1] if res.path else "?",
                     **{k: res.config.get(k) for k in keys},
                     metric: m.get(metric), f"best_{metric}": (
                         float(hist[metric].max() if sweep.mode == "max" else hist[metric].min())
                         if hist is not None and metric in hist else None),
                     kl_key: m.get(kl_key), "iterations": m.get("training_iteration"),
                     "error": bool(res.error)})
    ok = [r for r in rows if r[metric] is not None and not r["error"]]
    if not ok:
        raise RuntimeError(f"sweep {root}: no trial reported {metric}")
    best = (max if sweep.mode == "max" else min)(ok, key=lambda r: r[metric])
    with open(out / "sweep_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    best_params = {k: best[k] for k in keys}
    cfg = trial_config(sweep, {**best_params, **spec.get("shared", {})})
    (out / "best_config.yaml").write_text(dump_config(cfg))
    _plot(grid, metric, kl_key, keys, out / "score_vs_kl.png")
    if progress:
        cols = ["trial", *keys, metric, kl_key, "iterations"]
        print("  ".join(f"{c:>22s}" for c in cols))
        for r in rows:
            print("  ".join(f"{_fmt(r[c]):>22s}" for c in cols))
        print(f"best: {best['trial']} {metric}={_fmt(best[metric])}  ->  "
              f"{locations.join(root, 'best_config.yaml')}")
    return {"rows": rows, "best": best}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _plot(grid, metric: str, kl_key: str, keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for res in grid:
        df = res.metrics_dataframe
        if df is None or metric not in df:
            continue
        label = ", ".join(f"{k.split('.')[-1]}={_fmt(res.config.get(k))}" for k in keys)
        x = df[kl_key] if kl_key in df else df["training_iteration"]
        ax.plot(x, df[metric], marker="o", ms=3, alpha=0.8, label=label)
    ax.set_xlabel(f"{kl_key} (KL of the policy from its reference)")
    ax.set_ylabel(metric)
    ax.set_title("score against KL, per trial (each point: one iteration)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
