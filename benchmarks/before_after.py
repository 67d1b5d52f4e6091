"""The same presets run by two versions of the code, side by side: did a change keep the
metrics and the time? For refactors (issue 15's shared controller layer) and any change
that must not move what a run computes.

Each round runs `rlhf-ray train PRESET` once with the baseline (a git revision, checked out
into a temporary worktree) and once with the working tree, alternating, on a local Ray
cluster each starts itself. Per preset it records the wall time of the whole command, the
time to the first iteration's row, and how far the metrics rows the two versions wrote
differ (`max_rel_diff` over every numeric key both have), beside how far two runs of the
baseline itself differ: the control loop is deterministic for a seed at smoke size, the LLM
loop's reward refits are asynchronous, so its later rows differ from run to run anyway.
Ratios are new / baseline, measured in one run. `--out` adds to an existing record, which
carries both code versions (git commits; the working tree's changes as a diff hash), the
machine, and its load (1-minute load average) at the start of every run.

    python benchmarks/before_after.py --baseline 010dd15 --presets hopper-smoke llm-tiny-smoke \
        --rounds 3 --out docs/results/before_after_issue15.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import code_version, machine

REPO = Path(__file__).resolve().parents[1]
TIMING = {"time_s", "iteration_s", "generate_s", "score_s", "learner_s", "sync_s", "labeling_s",
          "ppo_iteration_s", "sample_s", "learn_s", "relabel_s", "segment_cut_s", "tokens_per_s",
          "rm_train_s", "rm_train_time_s"}


def run_once(src: Path, preset: str, run_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), MUJOCO_GL="egl")
    env.pop("RAY_ADDRESS", None)
    load = round(os.getloadavg()[0], 2)  # what else the machine was doing as this run began
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "train", preset, "--run-dir",
                             str(run_dir), "--quiet"], cwd=src, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = None
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if first is None and metrics.exists() and metrics.read_text().strip():
            first = time.time() - t0
        time.sleep(0.1)
    out = proc.stdout.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{src} {preset}: exit {proc.returncode}\n{out[-3000:]}")
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    return {"wall_s": round(time.time() - t0, 2), "first_row_s": round(first or 0, 2),
            "load_1min": load, "rows": rows}


def max_rel_diff(a: list[dict], b: list[dict], upto: int | None = None) -> float:
    worst = 0.0
    for ra, rb in list(zip(a, b))[:upto]:
        for k in set(ra) & set(rb) - TIMING:
            x, y = ra[k], rb[k]
            if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-9))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="git revision to compare against")
    ap.add_argument("--presets", nargs="+", default=["hopper-smoke", "llm-tiny-smoke"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON file for the record")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="before-after-"))
    base = tmp / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base),
                    args.baseline], check=True, capture_output=True)
    record = {"baseline": args.baseline, "baseline_version": code_version(base),
              "new": "working tree", "new_version": code_version(REPO), "rounds": args.rounds,
              "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "presets": {}}
    try:
        for preset in args.presets:
            runs = {"baseline": [], "new": []}
            for r in range(args.rounds):
                for side, src in (("baseline", base), ("new", REPO)):
                    res = run_once(src, preset, tmp / f"{preset}-{side}-{r}")
                    runs[side].append(res)
                    print(f"{preset} round {r} {side}: wall {res['wall_s']} s, first row "
                          f"{res['first_row_s']} s", flush=True)
            med = {side: {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "first_row_s")}
                   for side, rs in runs.items()}
            same_seed = [max_rel_diff(b["rows"], n["rows"])
                         for b, n in zip(runs["baseline"], runs["new"])]
            early = [max_rel_diff(b["rows"], n["rows"], upto=3)
                     for b, n in zip(runs["baseline"], runs["new"])]
            olds = runs["baseline"]
            noise = [max_rel_diff(a["rows"], b["rows"]) for a, b in zip(olds, olds[1:])]
            entry = {"median": med,
                     "wall_ratio": round(med["new"]["wall_s"] / med["baseline"]["wall_s"], 3),
                     "first_row_ratio": round(med["new"]["first_row_s"]
                                              / med["baseline"]["first_row_s"], 3),
                     "max_rel_diff_all_rows": same_seed, "max_rel_diff_first_3_rows": early,
                     "baseline_vs_baseline_all_rows": noise,
                     "walls": {s: [x["wall_s"] for x in rs] for s, rs in runs.items()},
                     "first_rows": {s: [x["first_row_s"] for x in rs] for s, rs in runs.items()},
                     "load_1min": {s: [x["load_1min"] for x in rs] for s, rs in runs.items()}}
            record["presets"][preset] = entry
            print(f"{preset}: wall new/baseline {entry['wall_ratio']}, first row "
                  f"{entry['first_row_ratio']}; metrics max rel diff (all rows) "
                  f"{[round(x, 6) for x in same_seed]}, first 3 rows "
                  f"{[round(x, 6) for x in early]}; baseline vs baseline (all rows) "
                  f"{[round(x, 6) for x in noise]}", flush=True)
            if args.out:  # after each preset: a later failure keeps what was measured
                save(Path(args.out), record, args.baseline)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)],
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def save(out: Path, record: dict, baseline: str) -> None:
    """Write the record, keeping the presets an earlier record of this baseline holds."""
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("baseline") == baseline:
            record = {**record, "presets": {**old.get("presets", {}), **record["presets"]}}
    out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
