"""Direct preference optimization as a stage (`rlhf-ray dpo`): the SFT model fitted to
preference pairs with no reward model and no sampling (Rafailov et al. 2023), or with IPO's
loss (Azar et al. 2023); the losses are `core/dpo.py`'s.

The pairs are what the `rm` stage reads: `data.preferences_path` (chosen/rejected rows, or
K-way rankings, each giving its C(K, 2) pairs with the better response first) or the reviews
task's comparisons from human ratings; where the config names neither, the run's own
preference store: `labels.initial` rankings of SFT samples, asked of people on the labeling
page or of the oracle (`labeler.source`), those already stored counting (a resumed run asks
only for the rest; no label is lost). A pair's `mu` (the share preferring it) makes its label
soft; a ranking's pairs stay on one side of the held-out split. The reference is the SFT
model: a frozen copy, or under `model.lora` the policy itself with its adapters off (no
second copy). Dropout is off in both, as TRL has it, so the first
step's implicit rewards are 0. A held-out share of the pairs (`dpo.val_fraction`) measures the
implicit reward's accuracy. The reference's log-probs are computed once per pair before
training. The output is an ordinary Hugging Face folder (adapters merged).
"""

from __future__ import annotations

import contextlib
import json
import time

import numpy as np
import ray

from rlhf_ray.core.dpo import dpo_loss
from rlhf_ray.llm import data as lm_data
from rlhf_ray.llm.config import LLMConfig
from rlhf_ray.llm.modeling import (
    PromptFormat,
    disable_dropout,
    encode_pairs,
    load_policy,
    load_tokenizer,
    lora_on,
    save_model,
    sequence_logprobs,
    with_lora,
)
from rlhf_ray.llm.reward_trainer import rankings_to_comparisons
from rlhf_ray.llm.sft import trainable_policy
from rlhf_ray.runtime.actors import remote_role, stage_threads
from rlhf_ray.runtime.devices import actor_device
from rlhf_ray.storage import locations


def preference_pairs(cfg: LLMConfig) -> list[dict] | None:
    """[{prompt, left (preferred), right, mu, ranking_id}] from the data the config names;
    None where it names none (the run's preference store is then asked)."""
    given = lm_data.initial_preferences(cfg)
    return None if given is None else rankings_to_comparisons(given[0])


def store_pairs(ctl) -> list[dict]:
    """The run's own preference data (`ctl`: the LLM controller, its SFT model made): the
    labeler and its page started, `labels.initial` rankings of SFT samples asked for less
    those the store already holds, waited for (people) or answered at once (the oracle),
    then every stored comparison read back from the store."""
    cfg = ctl.cfg
    if ctl.labeler is None:
        ctl.feedback.start()
    stats = ray.get(ctl.labeler.stats.remote())
    ctl.feedback.requested = have = stats["labels_total"] + stats["labels_pending"]
    want = max(0, cfg.labels.initial - have)
    ctl.log(f"DPO from the run's preference store: {have} stored and {want} new rankings of "
            f"SFT samples ({cfg.labeler.source})")
    if want:
        ctl.start_generation(ctl.sft_path)
        ctl.ask_for_labels(want, block=True)
        for w in ctl.generation.workers:
            ray.kill(w)
    if cfg.labeler.source != "oracle":
        ctl.feedback.wait_for_labels(cfg.labels.initial)
    ctl.feedback.settle()
    pairs = ctl.feedback.stored_comparisons()
    if not pairs:
        raise ValueError("dpo: the run's preference store holds no comparisons (every answer "
                         "a tie or \"can't tell\"?): set data.preferences_path or label more")
    return pairs


def run_dpo(cfg: LLMConfig, sft_path: str, out_dir: str, progress: bool = False,
            device: str | None = None, pairs: list[dict] | None = None) -> dict:
    """DPO from `sft_path` into `out_dir` (a Hugging Face folder) on `pairs` (default: the
    config's `preference_pairs`); returns the statistics (also in `out_dir/dpo_stats.json`):
    the last epoch's loss and implicit-reward accuracy, and the held-out pairs' accuracy
    before and after."""
    import torch

    pairs = preference_pairs(cfg) if pairs is None else pairs
    if not pairs:
        raise ValueError("dpo: no preference pairs: set data.preferences_path (chosen/rejected "
                         "rows or rankings) or data.task=reviews, or label rankings in the run")
    torch.set_num_threads(stage_threads(cfg.run.stage_threads, cfg.run.torch_threads))
    torch.manual_seed(cfg.seed)
    d = cfg.dpo
    device = actor_device(device, "DPO")
    tok = load_tokenizer(sft_path)
    fmt = PromptFormat(tok, cfg.data.instruction, cfg.data.chat_template,
                       cfg.data.max_prompt_tokens)
    lora = cfg.model.lora.model_dump() if lora_on(cfg.model.lora.model_dump()) else None
    policy = trainable_policy(cfg, sft_path, device)
    if lora:
        policy = with_lora(policy, lora, top=cfg.model.train_top_layers)
    ref = None if lora else load_policy(sft_path, cfg.model.dtype, device).eval() \
        .requires_grad_(False)
    for model in (policy, ref):
        if model is not None:
            disable_dropout(model)
    rng = np.random.default_rng(cfg.seed)
    # held out by ranking (a prompt's pairs all on one side), a share of the pairs
    groups: dict = {}
    for i, r in enumerate(pairs):
        groups.setdefault(r.get("ranking_id") or f"pair-{i}", []).append(r)
    keys = list(groups)
    val, train = [], []
    for j in rng.permutation(len(keys)):
        side = val if len(val) < d.val_fraction * len(pairs) else train
        side += groups[keys[j]]
    if not train:
        raise ValueError(f"dpo: {len(pairs)} preference pairs leave none to train on after "
                         f"dpo.val_fraction={d.val_fraction}")
    mean = d.loss == "ipo"

    def logps(rows: list[dict], model, side: str):
        b = encode_pairs(tok, [r["prompt"] for r in rows], [r[side] for r in rows],
                         cfg.data.max_prompt_tokens, cfg.generation.max_new_tokens, fmt)
        return sequence_logprobs(model, b.to(device), mean)

    # the reference's log-probs never change: computed once per pair, before training (as
    # TRL's precompute_ref_log_probs), and then the frozen copy is let go; `seconds` counts it
    t0 = time.time()
    with torch.no_grad(), (policy.disable_adapter() if ref is None
                           else contextlib.nullcontext()):
        for s in range(0, len(pairs), d.batch_size):
            part = pairs[s:s + d.batch_size]
            for side in ("left", "right"):
                for r, lp in zip(part, logps(part, policy if ref is None else ref, side).tolist()):
                    r[f"ref_{side}"] = lp
    del ref

    def step(rows: list[dict], train_step: bool) -> dict:
        mu = torch.tensor([r.get("mu", 1.0) for r in rows], device=device)
        rc, rr = (torch.tensor([r[f"ref_{side}"] for r in rows], device=device)
                  for side in ("left", "right"))
        with torch.set_grad_enabled(train_step):
            loss, stats = dpo_loss(logps(rows, policy, "left"), logps(rows, policy, "right"),
                                   rc, rr, d.beta, d.loss, mu)
        if train_step:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return {"loss": float(loss), **stats}

    def evaluate() -> float | None:
        if not val:
            return None
        policy.eval()
        parts = [val[s:s + d.batch_size] for s in range(0, len(val), d.batch_size)]
        acc = [step(part, False)["reward_accuracy"] * len(part) for part in parts]
        policy.train()
        return float(sum(acc) / len(val))

    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=d.lr)
    val_before = evaluate()
    epochs = []
    for epoch in range(d.epochs):
        perm = rng.permutation(len(train))
        rows = [step([train[i] for i in perm[s:s + d.batch_size]], True)
                for s in range(0, len(train), d.batch_size)]
        epochs.append({k: float(np.mean([r[k] for r in rows])) for k in rows[0]})
        if progress:
            print(f"dpo epoch {epoch + 1}/{d.epochs} | loss {epochs[-1]['loss']:.4f} | "
                  f"reward accuracy {epochs[-1]['reward_accuracy']:.3f} | margin "
                  f"{epochs[-1]['reward_margin']:+.3f} | {time.time() - t0:.0f}s", flush=True)
    stats = {"pairs": len(train), "val_pairs": len(val), "loss": d.loss, "beta": d.beta,
             "epochs": epochs, "val_reward_accuracy_before": val_before,
             "val_reward_accuracy": evaluate(), "seconds": time.time() - t0}
    if lora:
        policy = policy.merge_and_unload()
    out = save_model(policy, tok, out_dir)
    locations.write_text(locations.join(out, "dpo_stats.json"), json.dumps(stats, indent=1))
    return stats


class DPOTask:
    """DPO as an actor, placed where the learner's resources are (a GPU node)."""

    def run(self, cfg: LLMConfig, sft_path: str, out: str, pairs: list[dict] | None) -> dict:
        return run_dpo(cfg, sft_path, out, progress=True, device=cfg.placement.devices()["sft"],
                       pairs=pairs)


def dpo_stage(ctl) -> dict:
    """The `dpo` stage of the LLM controller `ctl` (its SFT model made): DPO in an actor on
    the learner's resources, then the yardstick on held-out prompts, the SFT model and the
    DPO model each sampled with the same draws (a paired gain). Writes RUN/dpo (the model)
    and RUN/dpo.json."""
    cfg = ctl.cfg
    out = ctl.folder.loc("dpo")
    pairs = preference_pairs(cfg)
    if pairs is None:  # the run's own preference store
        pairs = store_pairs(ctl)
    task = remote_role(DPOTask, cfg.placement.learner, ctl.bundle("learner"),
                       pg=ctl.pg).remote()
    ctl.actors.append(task)
    ctl.log(f"DPO ({cfg.dpo.loss} loss, beta {cfg.dpo.beta}) of the SFT model on "
            "preference pairs")
    stats = ray.get(task.run.remote(cfg, ctl.sft_path, out, pairs))
    ray.kill(task)
    result = {"dpo_path": out, **stats}
    if ctl.held_out.yardstick() is None:
        ctl.log("no eval.yardstick or labeler.oracle: the DPO model is not judged")
    else:
        for tag, path in (("sft", ctl.sft_path), ("dpo", out)):
            ctl.start_generation(path)
            ev, _, samples = ctl.held_out.evaluate(ctl.generation, None)
            ctl.held_out.write_samples(tag, samples)
            result.update({f"{tag}_{k}": v for k, v in ev.items()})
            for w in ctl.generation.workers:
                ray.kill(w)
        gain = result["dpo_eval_score_mean"] - result["sft_eval_score_mean"]
        result["eval_score_gain"] = gain
        ctl.log(f"held-out yardstick: SFT {result['sft_eval_score_mean']:.3f} -> DPO "
                f"{result['dpo_eval_score_mean']:.3f} (gain {gain:+.3f})")
    (ctl.run_dir / "dpo.json").write_text(json.dumps(result, indent=1, default=str))
    return result
