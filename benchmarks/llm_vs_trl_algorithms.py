"""TRL 1.16's GRPOTrainer, RLOOTrainer and DPOTrainer beside this project's GRPO, RLOO and
DPO, on SmolLM2-135M-Instruct (the `smollm2-reviews` preset), in one run.

Both sides start from the same SFT model and score with the same reward model (this project's
`sft` and `rm` stages, once per seed, shared with `benchmarks/llm_algorithms.py` when given
the same `--runs`), and share: the training prompts, as the policy reads them (the chat
template rendered once, here, and handed to TRL as text); the group size K, the responses per
iteration, the minibatch, the epochs over each batch, the response length, the sampling
temperature, the clip range, the learning rate (constant), gradient clipping, the fixed KL
coefficient and where it goes (GRPO: k3 in the loss; RLOO: in the reward), LoRA (r, alpha,
the same top blocks) and 2 torch threads. TRL's reward is this project's reward model read
the way this project's Serve deployment reads it (the raw prompt; a response cut at the
length limit without an EOS, unless the preset's `generation.fixed_length`), normalized by
its mean and std on the SFT model's held-out
samples, as this project's run normalizes (measured here once per seed). DPO: the same
pairs (the reward model's human comparisons), beta, learning rate, batch and epochs; none held
out on either side. This
project's DPO takes each pair's soft label (the raters' agreement, mu); TRL's takes every
pair as certain (its `label_smoothing` is one constant): a difference in what the two offer.

Per algorithm and seed: wall time per iteration (GRPO, RLOO: one batch of responses through
all its updates, the first left out, medians; DPO: the whole fit, the reference's pass
included), ours / TRL's; and the yardstick's gain over the SFT model, each final policy judged
here by the same function: the preset's held-out prompts, the same sampling draws, the MiniLM
probe (never the training signal). The two sides alternate (ours first on even seeds), each
in its own process, one at a time; the machine's load is recorded before each. Targets: time
<= 0.8 of TRL's per algorithm, gain at least TRL's within the seed spread.

    python benchmarks/llm_vs_trl_algorithms.py --seeds 0 1 2 --iterations 20
    python benchmarks/llm_vs_trl_algorithms.py --seeds 0 --iterations 2 --algorithms grpo \\
        --preset smollm2-reviews-smoke --runs /tmp/trl-smoke --out /tmp/trl-smoke.json

Needs the `bench` extra (trl 1.16.0). Finished runs are read back, so it can be stopped and
run again.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_algorithms import stages  # noqa: E402
from record import code_version, machine, versions, write  # noqa: E402

K = 4
BETA = {"grpo": 0.04, "rloo": 0.05}  # TRL's documented GRPO beta before 0.19; RLOO's default
OURS = {
    "grpo": ["ppo.advantage_estimator=grpo", f"ppo.samples_per_prompt={K}",
             "ppo.kl.placement=loss", "ppo.kl.estimator=k3", "ppo.kl.controller=fixed",
             f"ppo.kl.init_coef={BETA['grpo']}"],
    "rloo": ["ppo.advantage_estimator=rloo", f"ppo.samples_per_prompt={K}",
             "ppo.kl.controller=fixed", f"ppo.kl.init_coef={BETA['rloo']}"],
}


def sh(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t0


# ---------------------------------------------------------------- this project's side
def ours(preset: str, algo: str, seed: int, base: Path, run: Path, iterations: int) -> dict:
    common = [f"seed={seed}", "--run-dir", str(run), f"model.sft_path={base / 'sft'}"]
    if algo == "dpo":
        if not (run / "dpo.json").exists():
            sh(["rlhf-ray", "dpo", preset, *common, "dpo.val_fraction=0"])
            ran_with(run)
        d = json.loads((run / "dpo.json").read_text())
        return {"model": str(run / "dpo"), "seconds": d["seconds"], "pairs": d["pairs"]}
    if not (run / "final" / "controller.json").exists():
        total = sh(["rlhf-ray", "ppo", preset, *common,
                    f"model.reward_path={base / 'reward_model'}", f"run.iterations={iterations}",
                    "eval.every=0", "run.checkpoint_every=0",
                    f"ppo.rollout_batch_size={rollout(preset) // K}", *OURS[algo]])
        (run / "wall_s.txt").write_text(f"{total}\n")
        ran_with(run)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    per = [r["iteration_s"] for r in rows[1:]] or [rows[0]["iteration_s"]]
    return {"model": str(run / "final" / "policy"), "iteration_s": statistics.median(per),
            "iterations": len(rows), "reward_norm": [rows[0]["reward_norm_mean"],
                                                     rows[0]["reward_norm_std"]],
            "learner_peak_rss_mb": json.loads((run / "resources.json").read_text())
            ["peak_rss_mb"].get("learner_0")}


def rollout(preset: str) -> int:
    from rlhf_ray.config import load_config

    cfg = load_config(preset)
    return cfg.ppo.rollout_batch_size * cfg.ppo.samples_per_prompt


# ---------------------------------------------------------------- TRL's side (a child process)
def trl_child(spec: dict) -> None:
    """Runs in its own process: TRL's trainer on the spec, the merged model saved, the times
    written to spec['out']/trl.json."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback

    from rlhf_ray.config import load_config
    from rlhf_ray.llm import data as lm_data
    from rlhf_ray.llm.modeling import (
        PromptFormat,
        decoder_layers,
        encode_pairs,
        last_token_scores,
        load_scalar_model,
        load_tokenizer,
        top_layers,
    )

    torch.set_num_threads(spec["threads"])
    cfg = load_config(spec["preset"], [f"seed={spec['seed']}"])
    algo, out = spec["algo"], Path(spec["out"])
    tok = load_tokenizer(spec["sft"])
    fmt = PromptFormat(tok, cfg.data.instruction, cfg.data.chat_template,
                       cfg.data.max_prompt_tokens)
    # SmolLM2's pad is its EOS <|im_end|>, which its chat template puts inside every prompt;
    # TRL finds completion ends by the EOS id, so it gets <|endoftext|> as its pad
    sft_pad, tok.pad_token = tok.pad_token, "<|endoftext|>"
    policy = AutoModelForCausalLM.from_pretrained(spec["sft"], dtype=torch.float32)
    m = cfg.model
    lora = LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                      target_modules=list(m.lora.target_modules), task_type="CAUSAL_LM",
                      layers_to_transform=top_layers(policy, m.train_top_layers),
                      layers_pattern=decoder_layers(policy)[0].rsplit(".", 1)[-1])
    p = cfg.ppo
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.time() - self.t0)

    common = dict(output_dir=str(out / "trainer"), seed=spec["seed"],
                  learning_rate=cfg.dpo.lr if algo == "dpo" else p.lr,
                  lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                  save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                  disable_dropout=True,
                  # TRL turns it on by default (memory for time); ours is off in the preset
                  gradient_checkpointing=cfg.model.gradient_checkpointing)
    import datasets

    if algo == "dpo":
        from trl import DPOConfig, DPOTrainer

        from rlhf_ray.llm.dpo import preference_pairs

        pairs = preference_pairs(cfg)
        rows = {"prompt": [tok.decode(fmt.encode(x["prompt"])) for x in pairs],
                "chosen": [x["left"] for x in pairs], "rejected": [x["right"] for x in pairs]}
        d = cfg.dpo
        args = DPOConfig(**common, per_device_train_batch_size=d.batch_size,
                         num_train_epochs=d.epochs, beta=d.beta, loss_type="sigmoid",
                         max_grad_norm=0.0,  # ours does not clip DPO's gradients
                         precompute_ref_log_probs=True,
                         max_length=cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens + 1)
        trainer = DPOTrainer(model=policy, args=args, processing_class=tok, peft_config=lora,
                             train_dataset=datasets.Dataset.from_dict(rows), callbacks=[Clock()])
    else:
        prompts = lm_data.load_prompts(cfg, "train")
        rendered = [tok.decode(fmt.encode(x)) for x in prompts]
        raw_of = dict(zip(rendered, prompts))
        rm = load_scalar_model(spec["reward_model"], "float32", "cpu").eval()
        rm_tok = load_tokenizer(spec["reward_model"])
        mean, std = spec["reward_norm"]
        eos = tok.eos_token_id
        max_resp = cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens + 1

        def reward(prompts, completions, completion_ids, **kw):
            b = encode_pairs(rm_tok, [raw_of[x] for x in prompts], list(completions),
                             cfg.data.max_prompt_tokens, max_resp,
                             finished=[cfg.generation.fixed_length or eos in ids
                                       for ids in completion_ids])
            with torch.no_grad():
                s = last_token_scores(rm, b.input_ids, b.attention_mask, b.position_ids)
            return ((s - mean) / std).clamp(-p.reward_clip, p.reward_clip).tolist()

        per_iter = spec["responses"]
        gen = dict(num_generations=K, per_device_train_batch_size=p.minibatch_size,
                   steps_per_generation=per_iter // p.minibatch_size,
                   num_iterations=p.ppo_epochs, max_completion_length=cfg.generation.max_new_tokens,
                   temperature=cfg.generation.temperature, top_p=1.0, beta=BETA[algo],
                   epsilon=p.cliprange, max_grad_norm=p.max_grad_norm,
                   max_steps=spec["iterations"] * (per_iter // p.minibatch_size) * p.ppo_epochs)
        data = datasets.Dataset.from_dict({"prompt": rendered})
        if algo == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            args = GRPOConfig(**common, **gen, loss_type="grpo", scale_rewards="group")
            trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=args,
                                  train_dataset=data, processing_class=tok, peft_config=lora,
                                  callbacks=[Clock()])
        else:
            from trl import RLOOConfig, RLOOTrainer

            args = RLOOConfig(**common, **gen)
            trainer = RLOOTrainer(model=policy, reward_funcs=reward, args=args,
                                  train_dataset=data, processing_class=tok, peft_config=lora,
                                  callbacks=[Clock()])
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    merged = trainer.model.merge_and_unload()
    tok.pad_token = sft_pad  # the SFT model's, as ours saves
    merged.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    res = {"seconds": seconds, "step_s": times,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if algo != "dpo":  # one iteration: a batch of responses through all its updates
        n = (spec["responses"] // p.minibatch_size) * p.ppo_epochs
        cycles = [sum(times[i:i + n]) for i in range(0, len(times) - n + 1, n)]
        res.update(iteration_s=statistics.median(cycles[1:] or cycles), iterations=len(cycles))
    (out / "trl.json").write_text(json.dumps(res, indent=1))


def trl(spec: dict) -> dict:
    out = Path(spec["out"])
    if not (out / "trl.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        ran_with(out)
        (out / "spec.json").write_text(json.dumps(spec, indent=1))
        sh([sys.executable, __file__, "--child", str(out / "spec.json")])
    return {"model": str(out / "model"), **json.loads((out / "trl.json").read_text())}


def ran_with(run: Path) -> str:
    """The code version a run folder was made with (recorded when it was made: a run read
    back later keeps its own)."""
    f = run / "code_version.txt"
    if not f.exists():
        f.write_text(code_version() + "\n")
    return f.read_text().strip()


# ---------------------------------------------------------------- the same judge for both
def judge(preset: str, seed: int, model: str) -> float:
    """The yardstick's mean on the preset's held-out prompts, sampled with the seed's
    evaluation draws (the SFT model and both final policies: paired)."""
    out = Path(model) / f"judged_s{seed}.json"
    if out.exists():
        return json.loads(out.read_text())["score"]
    from rlhf_ray.config import load_config
    from rlhf_ray.llm.data import load_prompts
    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.modeling import PromptFormat
    from rlhf_ray.llm.yardstick import load_yardstick

    cfg = load_config(preset, [f"seed={seed}"])
    prompts = load_prompts(cfg, "eval")[:cfg.eval.num_prompts]
    w = HFGenerationWorker(model, cfg.generation.model_dump(), seed=seed, torch_threads=2,
                           max_prompt_tokens=cfg.data.max_prompt_tokens,
                           prompt_format=PromptFormat.settings(cfg.data))
    gen = w.generate(prompts, seed=2**31 + seed)
    score = float(statistics.fmean(load_yardstick(cfg).score(gen["prompts"],
                                                              gen["texts"])["score"]))
    out.write_text(json.dumps({"score": score, "prompts": gen["prompts"], "texts": gen["texts"],
                               "finished": [bool(f) for f in gen["finished"]]}))
    return score


def reward_norm(preset: str, seed: int, base: Path) -> list[float]:
    """The reward model's mean and std on the SFT model's held-out samples (the judge's):
    what this project's run normalizes its scores by, measured once here for TRL's side."""
    import numpy as np
    import torch

    from rlhf_ray.config import load_config
    from rlhf_ray.llm.modeling import (
        encode_pairs,
        last_token_scores,
        load_scalar_model,
        load_tokenizer,
    )

    cfg = load_config(preset)
    j = json.loads((base / "sft" / f"judged_s{seed}.json").read_text())
    path = str(base / "reward_model")
    rm, tok = load_scalar_model(path, "float32", "cpu").eval(), load_tokenizer(path)
    b = encode_pairs(tok, j["prompts"], j["texts"], cfg.data.max_prompt_tokens,
                     cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens + 1,
                     finished=j["finished"])
    with torch.no_grad():
        s = last_token_scores(rm, b.input_ids, b.attention_mask, b.position_ids).numpy()
    return [float(np.mean(s)), float(np.std(s) + 1e-8)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="smollm2-reviews")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algorithms", nargs="+", default=["grpo", "rloo", "dpo"],
                    choices=["grpo", "rloo", "dpo"])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--runs", default="runs/bench-alg-smollm2")
    ap.add_argument("--out", default="docs/results/llm_vs_trl_algorithms.json")
    args = ap.parse_args()
    if args.child:
        trl_child(json.loads(Path(args.child).read_text()))
        return 0
    import trl as trl_pkg

    from rlhf_ray.core.stats import mean_ci

    runs, n = Path(args.runs), args.iterations
    rows: dict[str, dict[int, dict]] = {a: {} for a in args.algorithms}
    for seed in args.seeds:
        base = stages(args.preset, seed, runs, [])
        sft = judge(args.preset, seed, str(base / "sft"))
        norm = reward_norm(args.preset, seed, base)
        for algo in args.algorithms:
            tag = f"{args.preset}-s{seed}-vs-trl-{algo}" + ("" if algo == "dpo" else f"-{n}")
            entry: dict = {"load_avg_before": {}}

            def load(side: str) -> list[float]:
                """The load average before the side's run, kept beside its folder."""
                f = runs / f"{tag}-{side}.load.json"
                if not f.exists():
                    f.write_text(json.dumps(os.getloadavg()))
                return json.loads(f.read_text())

            def run_ours():
                entry["load_avg_before"]["ours"] = load("ours")
                entry["ours"] = ours(args.preset, algo, seed, base, runs / f"{tag}-ours", n)

            def run_trl():
                entry["load_avg_before"]["trl"] = load("trl")
                entry["trl"] = trl({"algo": algo, "seed": seed, "preset": args.preset,
                                    "sft": str(base / "sft"),
                                    "reward_model": str(base / "reward_model"),
                                    "reward_norm": norm, "iterations": n, "threads": 2,
                                    "responses": rollout(args.preset),
                                    "out": str(runs / f"{tag}-trl")})

            order = [run_ours, run_trl] if seed % 2 == 0 else [run_trl, run_ours]
            for f in order:
                f()
            for side in ("ours", "trl"):
                entry[side]["gain"] = judge(args.preset, seed, entry[side]["model"]) - sft
            key = "seconds" if algo == "dpo" else "iteration_s"
            entry["time_ratio"] = entry["ours"][key] / entry["trl"][key]
            entry.update(sft_score=sft, machine=machine(),
                         code={side: ran_with(runs / f"{tag}-{side}") for side in ("ours", "trl")})
            rows[algo][seed] = entry
            print(f"{algo} seed {seed}: time ours/TRL {entry['time_ratio']:.2f} | gain ours "
                  f"{entry['ours']['gain']:+.3f} TRL {entry['trl']['gain']:+.3f}", flush=True)
    def ci(xs: list[float]) -> dict:
        return mean_ci(xs) if len(xs) > 1 else {"mean": xs[0]}

    summary = {}
    for algo, per in rows.items():
        s = args.seeds
        summary[algo] = {"time_ratio": ci([per[x]["time_ratio"] for x in s]),
                         "gain_ours": ci([per[x]["ours"]["gain"] for x in s]),
                         "gain_trl": ci([per[x]["trl"]["gain"] for x in s]),
                         "gain_ours_minus_trl": ci([per[x]["ours"]["gain"] - per[x]["trl"]["gain"]
                                                    for x in s])}
        print(f"{algo}: time ratio {summary[algo]['time_ratio']} | gain ours - TRL "
              f"{summary[algo]['gain_ours_minus_trl']}", flush=True)
    out = {"preset": args.preset, "iterations": n, "group_size": K, "beta": BETA,
           "trl": trl_pkg.__version__, "runs": {a: {str(s): v for s, v in per.items()}
                                                for a, per in rows.items()},
           "summary": summary,
           **versions([{"code": v["code"][side]} for per in rows.values() for v in per.values()
                       for side in ("ours", "trl")]),
           "note": "time_ratio: ours / TRL's (GRPO, RLOO: median seconds per iteration, the "
                   "first left out; DPO: the whole fit); gain: the yardstick on held-out "
                   "prompts, final policy minus SFT, both judged by the same function with "
                   "the same draws; t intervals over seeds"}
    write(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
