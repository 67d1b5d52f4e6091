"""The LLM workload's report: curves over PPO iterations (PNG) and, where the run evaluated
on held-out prompts, `report.md` (the over-optimization picture's numbers, the SFT model's
and the final policy's continuations, time and memory per role)."""

from __future__ import annotations

import json
from pathlib import Path


def report(run_dir: str, rows: list[dict], output: str | None, plt,
           shown_as: str | None = None) -> str:
    """Curves (PNG) and, where the run evaluated on held-out prompts, `report.md`: the
    over-optimization picture's numbers, a table of prompts with the SFT model's and the final
    policy's continuations and their scores, time and memory per role."""
    it = [r["iteration"] for r in rows]

    def series(key, rs=rows):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in rs]

    evals = [r for r in rows if r.get("eval_score_mean") is not None]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    ax = axes[0, 0]
    ax.plot(it, series("oracle_score_mean"), label="policy, training samples")
    if evals:
        ax.plot([r["iteration"] for r in evals], series("eval_score_mean", evals), "o-",
                label="policy, held-out prompts")
    ax.plot(it, series("sft_oracle_score_mean"), ls="--", color="gray", label="SFT model")
    ax.set_title("yardstick score (never trained on)")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(it, series("rm_score_mean"), color="tab:orange")
    ax.set_title("reward-model score")
    ax = axes[0, 2]
    if evals:  # Gao et al. 2022: the proxy and the gold score against KL from the SFT model
        kl = [0.0] + series("kl_mean", evals)
        rm = [evals[0].get("sft_eval_rm_score_mean")] + series("eval_rm_score_mean", evals)
        judge = [evals[0].get("sft_eval_score_mean")] + series("eval_score_mean", evals)
        ax.plot(kl, rm, "o-", color="tab:orange", label="reward model (proxy)")
        ax.set_ylabel("reward-model score")
        ax2 = ax.twinx()
        ax2.plot(kl, judge, "s-", color="tab:blue", label="yardstick (gold)")
        ax2.set_ylabel("yardstick score")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("KL(policy || SFT) per response (nats)")
    ax.set_title("held-out: proxy vs gold over KL")
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
    ax = axes[1, 2]
    ax.plot(it, series("iteration_s"), color="tab:brown", label="iteration")
    ax.plot(it, series("learner_s"), color="tab:gray", label="learner")
    ax.set_title("seconds per iteration")
    ax.legend(fontsize=8)
    for a in list(axes[0, :2]) + list(axes[1, :]):
        a.set_xlabel("PPO iteration")
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = output or str(Path(run_dir) / "report.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    if evals:
        _report_llm_md(Path(run_dir), rows, evals, Path(out))
    return out


def _samples(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _report_llm_md(run: Path, rows: list[dict], evals: list[dict], png: Path) -> None:
    last = evals[-1]
    lines = [f"# {run.name}", "", f"![curves]({png.name})", "",
             "| held-out prompts | SFT model | final policy |", "|---|---|---|"]
    for key, label in (("score", "yardstick"), ("vader", "VADER compound"),
                       ("rm_score", "reward model")):
        a, b = last.get(f"sft_eval_{key}_mean"), last.get(f"eval_{key}_mean")
        if a is not None and b is not None:
            lines.append(f"| {label} | {a:.3f} | {b:.3f} |")
    lines.append(f"| KL to the SFT model (nats/response) | 0 | {last.get('kl_mean', 0):.2f} |")
    warned = [r["iteration"] for r in evals if r.get("rm_judge_diverging")]
    lines += ["", "Reward model vs yardstick: " + (
        f"**parted ways** at iteration(s) {warned} (Gao et al. 2022)" if warned
        else "no warning (they did not part ways)"), ""]
    sft, final = _samples(run / "samples_sft.jsonl"), _samples(run / "samples_final.jsonl")
    by_prompt = {s["prompt"]: s for s in sft}
    pairs = [(by_prompt[f["prompt"]], f) for f in final if f["prompt"] in by_prompt]
    if pairs:
        lines += ["| prompt | SFT continuation | score | final continuation | score |",
                  "|---|---|---|---|---|"]
        for a, b in pairs[:12]:
            lines.append(f"| {_cell(a['prompt'])} | {_cell(a['response'])} | {a['score']:.2f} | "
                         f"{_cell(b['response'])} | {b['score']:.2f} |")
        lines.append("")
    tp = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    its = [r["iteration_s"] for r in rows if r.get("iteration_s")]
    if its:
        lines.append(f"PPO: {len(rows)} iterations, {rows[-1].get('time_s', 0):.0f} s; "
                     f"{sorted(its)[len(its) // 2]:.1f} s per iteration (median), "
                     f"{sorted(tp)[len(tp) // 2]:.1f} tokens/s (median)")
    res = run / "resources.json"
    if res.exists():
        mem = json.loads(res.read_text())
        lines += ["", "| role | peak memory (MiB) |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in sorted(mem["peak_rss_mb"].items())]
        lines.append(f"| PPO roles together (sum of peaks, shared pages counted in each) | "
                     f"{mem['ppo_roles_peak_rss_sum_mb']:.0f} |")
        if mem.get("machine_used_peak_mb"):
            lines.append(f"| the machine's used memory, peak over the run | "
                         f"{mem['machine_used_peak_mb']:.0f} |")
    (run / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
