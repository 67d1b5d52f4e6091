"""The reward-KL frontier, as the DPO paper draws it: the held-out yardstick's score against
the KL to the SFT model at each held-out evaluation of each run, one colour per algorithm
(the run folders `benchmarks/llm_algorithms.py` writes) and one per setting of a Tune sweep
over beta and the KL target (`rlhf-ray sweep tune_configs/smollm2-kl-grid.yaml`): the picture
a user runs Tune for. DPO has no KL of its own in the rows; it is drawn as a horizontal line
at its score. The SFT model is the line y = its score at KL 0.

    python benchmarks/llm_frontier.py --algorithms runs/bench-alg-smollm2 \\
        --sweep runs/sweeps/smollm2-kl-grid --out docs/results/llm_frontier.png

Writes the plot and, beside it, the points it drew (JSON), each with its run folder.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def evaluations(run: Path) -> list[dict]:
    """(iteration, KL, yardstick, SFT's yardstick) at each held-out evaluation of a run."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return [{"iteration": r["iteration"], "kl": r["kl_mean"], "score": r["eval_score_mean"],
             "sft_score": r.get("sft_eval_score_mean")}
            for r in rows if r.get("eval_score_mean") is not None]


def algorithm_runs(folder: Path) -> dict[str, list[tuple[Path, list[dict]]]]:
    """{algorithm: [(run, evaluations)]} of `llm_algorithms.py`'s `PRESET-sSEED-ALGO` runs."""
    out: dict[str, list] = {}
    for run in sorted(folder.glob("*-s*-*")):
        m = re.match(r".*-s(\d+)-(.+)$", run.name)
        if not m or m.group(2) == "stages" or "vs-trl" in m.group(2):
            continue
        algo = m.group(2)
        if (run / "dpo.json").exists():
            d = json.loads((run / "dpo.json").read_text())
            out.setdefault(algo, []).append((run, [{"iteration": None, "kl": None,
                                                    "score": d["dpo_eval_score_mean"],
                                                    "sft_score": d["sft_eval_score_mean"]}]))
        elif (run / "metrics.jsonl").exists():
            out.setdefault(algo, []).append((run, evaluations(run)))
    return out


def sweep_runs(folder: Path) -> dict[str, list[tuple[Path, list[dict]]]]:
    """{"beta0=X target=Y": [(run, evaluations)]} of a sweep's trials (their run folders
    hold a resolved config.yaml)."""
    import yaml

    out: dict[str, list] = {}
    for cfg_file in sorted(folder.rglob("config.yaml")):
        run = cfg_file.parent
        if not (run / "metrics.jsonl").exists():
            continue
        kl = (yaml.safe_load(cfg_file.read_text()).get("ppo") or {}).get("kl") or {}
        label = f"beta0={kl.get('init_coef')} target={kl.get('target')}"
        out.setdefault(label, []).append((run, evaluations(run)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithms", type=Path, help="llm_algorithms.py's --runs folder")
    ap.add_argument("--sweep", type=Path, help="a sweep's folder")
    ap.add_argument("--out", default="docs/results/llm_frontier.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    if args.algorithms:
        groups.update(algorithm_runs(args.algorithms))
    if args.sweep:
        groups.update({f"sweep {k}": v for k, v in sweep_runs(args.sweep).items()})
    if not groups:
        print("no runs with held-out evaluations found", file=sys.stderr)
        return 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sft = [e["sft_score"] for runs in groups.values() for _, ev in runs for e in ev
           if e["sft_score"] is not None]
    if sft:
        ax.axhline(sum(sft) / len(sft), color="grey", ls=":", label="SFT model (mean)")
    points = {}
    for n, (label, runs) in enumerate(sorted(groups.items())):
        colour = f"C{n % 10}"
        pts = [(e["kl"], e["score"]) for _, ev in runs for e in ev]
        points[label] = [{"run": str(r), **e} for r, ev in runs for e in ev]
        if all(k is None for k, _ in pts):  # DPO: no KL in its rows
            ax.axhline(sum(s for _, s in pts) / len(pts), color=colour, ls="--",
                       label=f"{label} (no KL measured, n={len(pts)})")
            continue
        ax.scatter([k for k, _ in pts], [s for _, s in pts], s=14, color=colour,
                   label=f"{label} ({len(runs)} runs)", alpha=0.8)
    ax.set_xlabel("KL to the SFT model (nats per response, training rollouts)")
    ax.set_ylabel("held-out yardstick score")
    ax.set_title("reward-KL frontier: each point one held-out evaluation")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    Path(args.out).with_suffix(".json").write_text(json.dumps(points, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
