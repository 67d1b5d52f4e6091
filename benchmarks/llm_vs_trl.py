"""Side-by-side benchmark: this project's LLM PPO vs TRL's PPO trainer, in one run.

Same machine, same tiny model and tokenizer, the same SFT model and reward model (both built
once here by this project's `sft` and `rm` stages), the same prompts, rollout batch, PPO
epochs, minibatching, response length, sampling temperature, clip ranges, GAE parameters,
learning rate and fixed KL coefficient. Prints
  (1) wall time per PPO iteration, ours / TRL's (first iteration excluded: warm-up), and
  (2) the oracle-score gain over the SFT model after N iterations, for both,
and writes JSON plus a plot under docs/results/. Targets: (1) <= 0.8 with (2) equal or better.

The gain is measured the same way for both final policies: responses sampled for the same
held-out prompts with the same seed and sampling settings, scored by the task's oracle.

    python benchmarks/llm_vs_trl.py                      # 20 iterations, seed 0, 0.3M model
    python benchmarks/llm_vs_trl.py --iterations 30 --seeds 0 1
    python benchmarks/llm_vs_trl.py --hidden 256 --layers 3 --intermediate 512   # ~2M (llm-tiny)
    python benchmarks/llm_vs_trl.py --model smollm2 --iterations 8 --lr 1e-5 --tag llm_vs_trl_smollm2
    python benchmarks/llm_vs_trl.py --model smollm2 --finetune preset --epochs 4 --iterations 10 \
        --lr 5e-4 --tag llm_vs_trl_smollm2_e4

`--model smollm2`: SmolLM2-135M-Instruct on the reviews task (the smollm2-reviews preset's SFT
and reward model, its prompts through the chat template, 16 responses of up to 20 tokens, one
PPO epoch), judged by the preset's yardstick (the MiniLM probe) on 256 held-out prompts, two
samples each. `--finetune full`: both sides fully fine-tuned. `--finetune preset` (the
preset's own mode): LoRA r=16 on the top 8 of 30 blocks of the policy (TRL: the same peft
`LoraConfig` with `layers_to_transform`; the reference is the policy with adapters off on
both sides) and the critic's top 8 blocks trained, the rest frozen (TRL's value model frozen
the same way, by the same function). TRL's PPO finds sequence ends and padding by the pad token id, and
SmolLM2's pad is its EOS `<|im_end|>`, which its chat template also puts inside every prompt:
TRL is given `<|endoftext|>` as its pad token so that it reads the prompts right (this
project masks by lengths and needs no such change).

Needs TRL 1.12.0, the last release with its PPO trainer: not the `bench` extra's 1.16.0
(its GRPO, RLOO and DPO trainers: `benchmarks/llm_vs_trl_algorithms.py`), so an environment of
its own, `pip install -e . trl==1.12.0`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

BATCH, MICRO, EPOCHS, RESPONSE = 64, 16, 4, 12
PRESET = "llm-tiny"
SMOLLM2 = {"batch": 16, "micro": 8, "epochs": 1, "response": 20}
# both sides fully fine-tuned, no online labels: the same trainable parameters
SMOLLM2_OURS = ["model.lora.r=0", "model.train_top_layers=null", "eval.every=0"]
FINETUNE = "full"  # smollm2: "full", or "preset" (LoRA on the top blocks, as the preset trains)


def settings(iterations: int, seed: int, kl_coef: float, lr: float) -> list[str]:
    """The shared PPO settings, as overrides of the preset."""
    return [f"seed={seed}", f"run.iterations={iterations}", "run.checkpoint_every=0",
            f"generation.max_new_tokens={RESPONSE}",
            f"ppo.rollout_batch_size={BATCH}", f"ppo.minibatch_size={BATCH}",
            f"ppo.micro_batch_size={MICRO}", f"ppo.ppo_epochs={EPOCHS}", f"ppo.lr={lr}",
            f"ppo.critic_lr={lr}", "ppo.kl.controller=fixed", f"ppo.kl.init_coef={kl_coef}",
            "ppo.kl.estimator=k1", "ppo.normalize_reward=false", "ppo.reward_clip=null",
            "ppo.gamma=1.0", "ppo.lam=0.95", "ppo.cliprange=0.2", "ppo.cliprange_value=0.2",
            "generation.temperature=1.0", "labels.per_iteration=0"]


def model_overrides(hidden: int, layers: int, intermediate: int) -> list[str]:
    return [f"model.tiny.hidden_size={hidden}", f"model.tiny.num_layers={layers}",
            f"model.tiny.intermediate_size={intermediate}"]


def prepare(workdir: Path, seed: int, model: list[str]) -> tuple[str, str]:
    """SFT model and reward model, once, through this project's stages."""
    from rlhf_ray.config import load_config
    from rlhf_ray.train import train

    cfg = load_config(PRESET, [f"seed={seed}", *model])
    run = train(cfg, run_dir=str(workdir / "prep"), stages="rm", progress=False)
    return str(run / "sft"), str(run / "reward_model")


def run_ours(workdir: Path, sft: str, rm: str, overrides: list[str]) -> dict:
    from rlhf_ray.config import load_config
    from rlhf_ray.train import train

    cfg = load_config(PRESET, overrides + [f"model.sft_path={sft}", f"model.reward_path={rm}"])
    rows: list[dict] = []
    t0 = time.time()
    run = train(cfg, run_dir=str(workdir / "ours"), stages="ppo", on_metrics=rows.append,
                progress=False)
    return {"wall_s": time.time() - t0, "iteration_s": [r["iteration_s"] for r in rows],
            "policy": str(run / "final" / "policy"),
            "train_oracle": [r["oracle_score_mean"] for r in rows],
            "kl": [r["kl_mean"] for r in rows]}


def run_trl(workdir: Path, sft: str, rm: str, iterations: int, seed: int, kl_coef: float,
            lr: float, prompts: list[str], threads: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhf_ray.llm.modeling import load_tokenizer

    torch.set_num_threads(threads)
    tok = load_tokenizer(sft)
    if PRESET == "llm-tiny":
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        ids = [bos + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    else:  # the prompts as the policy reads them (chat template), as our side does
        from rlhf_ray.config import load_config
        from rlhf_ray.llm.modeling import PromptFormat

        d = load_config(PRESET).data
        fmt = PromptFormat(tok, d.instruction, d.chat_template, d.max_prompt_tokens)
        ids = [fmt.encode(p) for p in prompts]
        if tok.pad_token_id == tok.eos_token_id:  # see the module docstring
            tok.pad_token = "<|endoftext|>"
    ds = Dataset.from_dict({"input_ids": ids})
    args = PPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=BATCH // MICRO, num_mini_batches=1,
        num_ppo_epochs=EPOCHS, total_episodes=iterations * BATCH, response_length=RESPONSE,
        stop_token="eos", temperature=1.0, kl_coef=kl_coef, kl_estimator="k1",
        cliprange=0.2, cliprange_value=0.2, vf_coef=1.0, gamma=1.0, lam=0.95,
        learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=1.0,
        local_rollout_forward_batch_size=BATCH, num_sample_generations=0, save_strategy="no",
        report_to="none", logging_steps=1, use_cpu=True, bf16=False, fp16=False, seed=seed,
        dataloader_num_workers=0, disable_tqdm=True)
    policy = AutoModelForCausalLM.from_pretrained(sft)
    ref = AutoModelForCausalLM.from_pretrained(sft)
    reward = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1)
    peft_config = None
    if FINETUNE == "preset":  # the preset's trainable parameters, on TRL's side
        from peft import LoraConfig

        from rlhf_ray.config import load_config
        from rlhf_ray.llm.modeling import decoder_layers, top_layers, train_top_layers

        m = load_config(PRESET).model
        peft_config = LoraConfig(
            r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
            target_modules=list(m.lora.target_modules), task_type="CAUSAL_LM",
            layers_to_transform=top_layers(policy, m.train_top_layers),
            layers_pattern=decoder_layers(policy)[0].rsplit(".", 1)[-1])
        train_top_layers(value, m.train_top_layers)
        ref = None  # TRL then takes the policy with its adapters off, as ours does
    stamps: list[float] = []
    logs: list[dict] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **k):  # noqa: ARG002
            if logs:
                stamps_logs.append(dict(logs))

    stamps_logs = logs
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref,
                         reward_model=reward, train_dataset=ds, value_model=value,
                         callbacks=[Clock()], peft_config=peft_config)
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    out = str(workdir / "trl_policy")
    trained = trainer.model.policy if hasattr(trainer.model, "policy") else policy
    if hasattr(trained, "merge_and_unload"):  # peft: the merged model, as ours saves it
        trained = trained.merge_and_unload()
    trained.save_pretrained(out)
    tok.save_pretrained(out)
    return {"wall_s": wall, "iteration_s": [b - a for a, b in zip(stamps, stamps[1:])],
            "policy": out, "kl": [g.get("objective/kl") for g in logs if "objective/kl" in g],
            "train_rm_score": [g.get("objective/scores") for g in logs if "objective/scores" in g]}


def evaluate(policy: str, prompts: list[str], seed: int) -> float:
    """Mean yardstick score of responses sampled from `policy` (same prompts, seed, settings):
    the tiny task's oracle, or the reviews task's MiniLM probe."""
    from rlhf_ray.config import load_config
    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.modeling import PromptFormat
    from rlhf_ray.llm.yardstick import load_yardstick

    cfg = load_config(PRESET)
    w = HFGenerationWorker(policy, {"max_new_tokens": RESPONSE, "temperature": 1.0},
                           cfg.data.max_prompt_tokens, seed=seed,
                           prompt_format=PromptFormat.settings(cfg.data))
    out = w.generate(prompts, n=4 if PRESET == "llm-tiny" else 2, seed=seed + 12345)
    return statistics.fmean(load_yardstick(cfg).score(out["prompts"], out["texts"])["score"])


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in record["seeds"]:
        for who, color in (("ours", "tab:blue"), ("trl", "tab:orange")):
            axes[0].plot(s[who]["iteration_s"], color=color, alpha=0.8,
                         label=f"{who} seed {s['seed']}")
            axes[1].plot(s[who]["kl"], color=color, alpha=0.8, label=f"{who} seed {s['seed']}")
    axes[0].set_title("wall time per PPO iteration (s)")
    axes[1].set_title("KL(policy || SFT) per response")
    for a in axes:
        a.set_xlabel("iteration")
        a.legend()
    r = record["summary"]
    fig.suptitle(f"time ratio ours/TRL {r['time_ratio']:.2f}; oracle gain ours "
                 f"{r['gain_ours']:+.3f} vs TRL {r['gain_trl']:+.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--trl-threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads for TRL (default: every core, as it runs alone)")
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--epochs", type=int, default=None,
                    help="PPO epochs over each batch on both sides (default: 4 tiny, 1 smollm2)")
    ap.add_argument("--finetune", choices=["full", "preset"], default="full",
                    help="smollm2: both sides fully fine-tuned, or the preset's LoRA on the "
                         "top blocks on both")
    ap.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra overrides for our side only, e.g. ppo.async_generation=true")
    ap.add_argument("--hidden", type=int, default=128, help="tiny model width")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--tag", default="llm_vs_trl")
    args = ap.parse_args()
    global BATCH, MICRO, EPOCHS, RESPONSE, PRESET, FINETUNE
    extra: list[str] = []
    if args.model == "smollm2":
        BATCH, MICRO, EPOCHS, RESPONSE = (SMOLLM2[k] for k in ("batch", "micro", "epochs",
                                                               "response"))
        PRESET, FINETUNE = "smollm2-reviews", args.finetune
        extra = SMOLLM2_OURS if FINETUNE == "full" else ["eval.every=0"]
    extra = [*extra, *args.ours]
    EPOCHS = args.epochs or EPOCHS

    import ray

    from rlhf_ray.llm import tiny

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "iterations": args.iterations,
              "batch": BATCH, "micro_batch": MICRO, "ppo_epochs": EPOCHS, "kl_coef": args.kl_coef,
              "lr": args.lr, "trl_threads": args.trl_threads,
              "model": ({"hidden": args.hidden, "layers": args.layers,
                         "intermediate": args.intermediate} if args.model == "tiny"
                        else {"preset": PRESET, "finetune": FINETUNE, "ours_overrides": extra}),
              "response_length": RESPONSE,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "seeds": []}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="llm-vs-trl-") as tmp:
            work = Path(tmp)
            if PRESET == "llm-tiny":
                sft, rm = prepare(work, seed, model_overrides(args.hidden, args.layers,
                                                              args.intermediate))
                eval_prompts = tiny.prompts(128, seed=seed + 999)
                train_prompts = tiny.prompts(512, seed=seed)
            else:
                from rlhf_ray.config import load_config
                from rlhf_ray.llm.data import load_prompts

                sft, rm = prepare(work, seed, [])
                eval_prompts = load_prompts(load_config(PRESET), "eval")[:256]
                train_prompts = load_prompts(load_config(PRESET), "train")
            sft_score = evaluate(sft, eval_prompts, seed)
            ours = run_ours(work, sft, rm, settings(args.iterations, seed, args.kl_coef, args.lr)
                            + extra)
            ours["oracle"] = evaluate(ours["policy"], eval_prompts, seed)
            trl = run_trl(work, sft, rm, args.iterations, seed, args.kl_coef, args.lr,
                          train_prompts, args.trl_threads)
            trl["oracle"] = evaluate(trl["policy"], eval_prompts, seed)
            for r in (ours, trl):
                r["per_iteration_s"] = statistics.fmean(r["iteration_s"][1:] or r["iteration_s"])
                r["gain"] = r["oracle"] - sft_score
                r.pop("policy")
            rec = {"seed": seed, "sft_oracle": sft_score, "ours": ours, "trl": trl}
            record["seeds"].append(rec)
            print(f"seed {seed}: s/iteration ours {ours['per_iteration_s']:.3f}  TRL "
                  f"{trl['per_iteration_s']:.3f}  | oracle SFT {sft_score:.3f}  ours "
                  f"{ours['oracle']:.3f} ({ours['gain']:+.3f})  TRL {trl['oracle']:.3f} "
                  f"({trl['gain']:+.3f})", flush=True)
    s = record["seeds"]
    ours_t = statistics.fmean(r["ours"]["per_iteration_s"] for r in s)
    trl_t = statistics.fmean(r["trl"]["per_iteration_s"] for r in s)
    record["summary"] = {"time_ratio": ours_t / trl_t, "ours_s_per_iteration": ours_t,
                         "trl_s_per_iteration": trl_t,
                         "gain_ours": statistics.fmean(r["ours"]["gain"] for r in s),
                         "gain_trl": statistics.fmean(r["trl"]["gain"] for r in s)}
    (out / f"{args.tag}.json").write_text(json.dumps(record, indent=1))
    plot(record, out / f"{args.tag}.png")
    r = record["summary"]
    print(f"\n(1) wall time per iteration ours / TRL: {r['time_ratio']:.3f} "
          f"({r['ours_s_per_iteration']:.3f} s vs {r['trl_s_per_iteration']:.3f} s)")
    print(f"(2) oracle-score gain after {args.iterations} iterations: ours {r['gain_ours']:+.3f}, "
          f"TRL {r['gain_trl']:+.3f}")
    print(f"wrote {out / (args.tag + '.json')} and {out / (args.tag + '.png')}")
    ray.shutdown()


if __name__ == "__main__":
    main()
