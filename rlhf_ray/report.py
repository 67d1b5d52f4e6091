"""`rlhf-ray report RUN_DIR`: learning curves of a run as one PNG."""

from __future__ import annotations

from pathlib import Path

from rlhf_ray.metrics import read_metrics


def report(run_dir: str, output: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl is empty")
    steps = [r["env_steps"] for r in rows]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in rows]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    ax.plot(steps, series("true_return_mean"), label="true return (env reward)")
    ax.set_title("true return")
    ax.set_xlabel("env steps")
    ax = axes[0, 1]
    ax.plot(steps, series("pred_return_mean"), color="tab:orange")
    ax.set_title("predicted return (reward model)")
    ax.set_xlabel("env steps")
    ax = axes[1, 0]
    ax.plot(steps, series("labels_total"), color="tab:green")
    ax.set_title("labels")
    ax.set_xlabel("env steps")
    ax = axes[1, 1]
    ax.plot(steps, series("rm_val_accuracy"), color="tab:red", label="validation")
    ax.plot(steps, series("rm_train_accuracy"), color="tab:purple", alpha=0.6, label="train")
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("reward-model accuracy on held-out comparisons")
    ax.set_xlabel("env steps")
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = output or str(Path(run_dir) / "report.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
