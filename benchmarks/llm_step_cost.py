"""What one PPO step on SmolLM2-135M costs, by fine-tuning mode, side by side in one process.

For each mode -- full fine-tuning, LoRA on every block, LoRA on the top N blocks with
`model.train_top_layers: N` -- one generation worker and one learner on the converted
SmolLM2 folder: 16 responses (smollm2-reviews' prompts, its chat template, 20 new tokens),
then `--steps` PPO steps and weight syncs, timed; the first step is warm-up. Writes JSON.

`--micro`: the preset's mode (LoRA on the top N blocks) with one minibatch of the whole batch
split into micro batches by rows (all, half, a quarter) or by a token budget
(`ppo.micro_batch_tokens`), each in a fresh process so that its peak resident memory is its
own: what a micro batch costs in memory and time, to size `micro_batch_tokens` by memory.

`--trunk`: the preset's mode with 1 and 4 PPO epochs, the frozen blocks' output cached for the
epochs (`ppo.cache_frozen_blocks`) or recomputed in each, side by side in one process: what an
epoch costs with and without the cache.

    python benchmarks/llm_step_cost.py --threads 2 --out docs/results/llm_step_cost.json
    python benchmarks/llm_step_cost.py --micro --out docs/results/llm_micro_batch.json
    python benchmarks/llm_step_cost.py --trunk --out docs/results/llm_trunk_cache.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def measure(mode: str, top: int | None, r: int, threads: int, batch: int, steps: int,
            micro: dict | None = None) -> dict:
    """`micro`: PPO settings for the learner ({"minibatch_size", "micro_batch_size",
    "micro_batch_tokens", "ppo_epochs", "cache_frozen_blocks"}); one epoch by default."""
    import resource

    import numpy as np

    from rlhf_ray.config import load_config
    from rlhf_ray.llm import assets
    from rlhf_ray.llm.config import LoRAConfig, PPOConfig
    from rlhf_ray.llm.data import load_prompts
    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.learner import PPOLearner
    from rlhf_ray.llm.modeling import PromptFormat

    cfg = load_config("smollm2-reviews")
    path = str(assets.get("smollm2-135m"))
    lora = LoRAConfig(r=r).model_dump()
    gen = HFGenerationWorker(path, {"max_new_tokens": 20},
                             max_prompt_tokens=cfg.data.max_prompt_tokens, seed=0,
                             torch_threads=threads, prompt_format=PromptFormat.settings(cfg.data), lora=lora,
                             train_top_layers=top)
    micro = micro or {"minibatch_size": batch // 2, "micro_batch_size": batch // 2}
    ppo = PPOConfig(rollout_batch_size=batch, lr=1e-5, **{"ppo_epochs": 1, **micro}).model_dump()
    learner = PPOLearner(0, 1, path, path, ppo, torch_threads=threads, pad_id=gen.tok.pad_token_id,
                         lora=lora, train_top_layers=top)
    t = time.perf_counter()
    out = gen.generate(load_prompts(cfg)[:batch], seed=0)
    gen_s = time.perf_counter() - t
    out["scores"] = np.random.default_rng(0).normal(size=batch).astype(np.float32)
    step_s, sync_s = [], []
    for _ in range(steps):
        t = time.perf_counter()
        learner.step(out, 0.05)
        step_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        version, weights = learner.policy_weights()
        gen.update_weights(version, weights)
        sync_s.append(time.perf_counter() - t)
    sent = sum(v.numel() * v.element_size() for v in weights.values())
    import torch

    b = learner._batch(out)
    plan = learner._micro_batches(b, np.arange(len(b)))
    p_len, r_len = b.lengths()
    return {"mode": mode, "train_top_layers": top, "lora_r": r, "generate_s": gen_s, **micro,
            "micro_batch_rows": [len(m) for m in plan],
            "micro_batch_padded_tokens": [int(len(m) * (p_len[m].max() + r_len[m].max()))
                                          for m in plan],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads(),
            "step_s": step_s, "step_s_median_after_warmup": statistics.median(step_s[1:] or step_s),
            "sync_s_median": statistics.median(sync_s), "sync_mb": sent / 2 ** 20,
            "tokens": out["tokens"]}


def _child(args: tuple, queue) -> None:
    queue.put(measure(*args))


def micro_grid(args) -> int:
    """Micro batches by rows and by tokens, one fresh process each (peak RSS is per process)."""
    import multiprocessing as mp

    b = args.batch
    specs = [("rows_all", {"micro_batch_size": b}), ("rows_half", {"micro_batch_size": b // 2}),
             ("rows_quarter", {"micro_batch_size": b // 4}),
             *((f"tokens_{n}", {"micro_batch_tokens": n}) for n in args.budgets)]
    ctx = mp.get_context("spawn")
    rows = []
    for name, micro in specs:
        q = ctx.Queue()
        micro = {"minibatch_size": b, **micro}
        p = ctx.Process(target=_child, args=((name, args.top, 16, args.threads, b, args.steps,
                                              micro), q))
        p.start()
        rows.append(q.get())
        p.join()
        m = rows[-1]
        print(f"{name:14s} step {m['step_s_median_after_warmup']:5.1f} s  peak RSS "
              f"{m['peak_rss_mb']:6.0f} MiB  micro batches {m['micro_batch_rows']} rows, "
              f"{m['micro_batch_padded_tokens']} tokens", flush=True)
    base = rows[0]
    for m in rows:
        m["step_ratio_vs_one_micro_batch"] = m["step_s_median_after_warmup"] / base["step_s_median_after_warmup"]
        m["peak_rss_minus_one_micro_batch_mb"] = m["peak_rss_mb"] - base["peak_rss_mb"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "batch": b, "top": args.top,
                                          "rows": rows}, indent=1))
    return 0


def trunk_grid(args) -> int:
    """Cache on and off at 1 and 4 epochs: the per-epoch cost is the difference."""
    b = args.batch
    rows = []
    for epochs in (1, 4):
        for cache in (False, True):
            micro = {"minibatch_size": b // 2, "micro_batch_size": b // 2, "ppo_epochs": epochs,
                     "cache_frozen_blocks": cache}
            rows.append(measure(f"e{epochs}_{'cached' if cache else 'recomputed'}", args.top, 16,
                                args.threads, b, args.steps, micro))
            m = rows[-1]
            print(f"{m['mode']:16s} step {m['step_s_median_after_warmup']:5.2f} s", flush=True)
    t = {m["mode"]: m["step_s_median_after_warmup"] for m in rows}
    summary = {f"epoch_s_{c}": (t[f"e4_{c}"] - t[f"e1_{c}"]) / 3 for c in ("recomputed", "cached")}
    summary.update({f"step_ratio_e{e}_cached_vs_recomputed": t[f"e{e}_cached"] / t[f"e{e}_recomputed"]
                    for e in (1, 4)})
    summary["epoch_ratio_cached_vs_recomputed"] = summary["epoch_s_cached"] / summary["epoch_s_recomputed"]
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "batch": b, "top": args.top,
                                          "summary": summary, "rows": rows}, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--out", default="docs/results/llm_step_cost.json")
    ap.add_argument("--micro", action="store_true", help="micro batches by rows vs by tokens")
    ap.add_argument("--budgets", type=int, nargs="+", default=[512, 256])
    ap.add_argument("--trunk", action="store_true",
                    help="frozen blocks cached for the epochs vs recomputed, 1 and 4 epochs")
    args = ap.parse_args()
    if args.micro:
        return micro_grid(args)
    if args.trunk:
        return trunk_grid(args)
    rows = []
    for mode, top, r in (("full", None, 0), ("lora", None, 16), (f"lora_top{args.top}", args.top, 16)):
        rows.append(measure(mode, top, r, args.threads, args.batch, args.steps))
        m = rows[-1]
        print(f"{mode:12s} step {m['step_s_median_after_warmup']:5.1f} s  sync "
              f"{m['sync_s_median']:.2f} s ({m['sync_mb']:.0f} MB)  generate {m['generate_s']:.1f} s",
              flush=True)
    base = rows[0]["step_s_median_after_warmup"]
    for m in rows:
        m["step_ratio_vs_full"] = m["step_s_median_after_warmup"] / base
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "batch": args.batch,
                                          "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
