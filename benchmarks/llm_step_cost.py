"""What one PPO step on SmolLM2-135M costs, by fine-tuning mode, side by side in one process.

For each mode -- full fine-tuning, LoRA on every block, LoRA on the top N blocks with
`model.train_top_layers: N` -- one generation worker and one learner on the converted
SmolLM2 folder: 16 responses (smollm2-reviews' prompts, its chat template, 20 new tokens),
then `--steps` PPO steps and weight syncs, timed; the first step is warm-up. Writes JSON.

    python benchmarks/llm_step_cost.py --threads 2 --out docs/results/llm_step_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def measure(mode: str, top: int | None, r: int, threads: int, batch: int, steps: int) -> dict:
    import numpy as np

    from rlhf_ray import assets
    from rlhf_ray.config import LMPPOConfig, LoRAConfig, load_config
    from rlhf_ray.llm.data import load_prompts
    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.learner import PPOLearner
    from rlhf_ray.llm.modeling import PromptFormat

    cfg = load_config("smollm2-reviews")
    path = str(assets.get("smollm2-135m"))
    lora = LoRAConfig(r=r).model_dump()
    gen = HFGenerationWorker(path, {"max_new_tokens": 20}, cfg.data.max_prompt_tokens, 0, threads,
                             prompt_format=PromptFormat.settings(cfg.data), lora=lora,
                             train_top_layers=top)
    ppo = LMPPOConfig(rollout_batch_size=batch, minibatch_size=batch // 2,
                      micro_batch_size=batch // 2, ppo_epochs=1, lr=1e-5).model_dump()
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
    return {"mode": mode, "train_top_layers": top, "lora_r": r, "generate_s": gen_s,
            "step_s": step_s, "step_s_median_after_warmup": statistics.median(step_s[1:] or step_s),
            "sync_s_median": statistics.median(sync_s), "sync_mb": sent / 2 ** 20,
            "tokens": out["tokens"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--out", default="docs/results/llm_step_cost.json")
    args = ap.parse_args()
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
