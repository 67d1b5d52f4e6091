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
    if "env_steps" not in rows[0]:
        return _report_llm(run_dir, rows, output, plt)
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


def _report_llm(run_dir: str, rows: list[dict], output: str | None, plt) -> str:
    it = [r["iteration"] for r in rows]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in rows]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    ax.plot(it, series("oracle_score_mean"), label="policy")
    ax.plot(it, series("sft_oracle_score_mean"), ls="--", color="gray", label="SFT model")
    ax.set_title("oracle score (the yardstick)")
    ax.legend()
    ax = axes[0, 1]
    ax.plot(it, series("rm_score_mean"), color="tab:orange")
    ax.set_title("reward-model score")
    ax = axes[1, 0]
    ax.plot(it, series("kl_mean"), color="tab:red", label="KL(policy || SFT) per response")
    ax2 = ax.twinx()
    ax2.plot(it, series("kl_coef"), color="tab:purple", label="beta")
    ax.set_title("KL and its coefficient beta")
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")
    ax = axes[1, 1]
    ax.plot(it, series("labels_total"), color="tab:green")
    ax.set_title("labels (rankings)")
    for a in axes.flat:
        a.set_xlabel("PPO iteration")
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = output or str(Path(run_dir) / "report.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
