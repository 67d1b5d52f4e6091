"""InstructGPT step 1: supervised fine-tuning on (prompt, response) demonstrations.

Cross-entropy on the response tokens (and EOS) only. `run_sft` is plain torch; `SFTTask` runs
it as an actor so it lands where the learner's resources are (a GPU node).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from rlhf_ray.llm import assets
from rlhf_ray.llm import data as lm_data
from rlhf_ray.llm.config import LLMConfig
from rlhf_ray.llm.modeling import (
    PromptFormat,
    encode_pairs,
    load_policy,
    load_tokenizer,
    save_model,
    train_top_layers,
)
from rlhf_ray.llm.tiny import build_model
from rlhf_ray.runtime.actors import stage_threads
from rlhf_ray.runtime.devices import actor_device
from rlhf_ray.storage import locations


def trainable_policy(cfg: LLMConfig, src: str, device: str):
    """The policy to fine-tune, in train mode: from_pretrained gives eval mode, where
    transformers skips gradient checkpointing (`model.gradient_checkpointing`) and dropout."""
    model = load_policy(src, cfg.model.dtype, device)
    train_top_layers(model, cfg.model.train_top_layers)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


def run_sft(cfg: LLMConfig, out_dir: str, progress: bool = False,
            device: str | None = None) -> str:
    """Supervised fine-tuning on (prompt, response) demonstrations: cross-entropy on the
    response tokens (and EOS) only. Builds the tiny model first when `model.policy: tiny`.
    Saves a Hugging Face model folder (safetensors) to `out_dir`; returns it. `device`: the
    learners' (`placement.devices()`); None: CUDA where this process sees it."""
    import torch

    torch.set_num_threads(stage_threads(cfg.run.stage_threads, cfg.run.torch_threads))
    torch.manual_seed(cfg.seed)
    src = cfg.model.policy
    if src == "tiny":
        import tempfile

        # the tiny model's random initial weights: a local folder of this process
        src = os.path.join(tempfile.mkdtemp(prefix="rlhf-tiny-"), "init")
        t = cfg.model.tiny
        build_model(src, t.hidden_size, t.num_layers, t.num_heads, t.intermediate_size,
                    seed=cfg.seed)
    else:
        src = assets.resolve(src)
    tok = load_tokenizer(src)
    device = actor_device(device, "SFT")
    model = trainable_policy(cfg, src, device)
    fmt = PromptFormat(tok, cfg.data.instruction, cfg.data.chat_template, cfg.data.max_prompt_tokens)
    rows = lm_data.load_sft(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.sft.lr)
    rng = np.random.default_rng(cfg.seed)
    bs = cfg.sft.batch_size
    t0 = time.time()
    for epoch in range(cfg.sft.epochs):
        perm = rng.permutation(len(rows))
        losses = []
        for s in range(0, len(rows), bs):
            part = [rows[i] for i in perm[s:s + bs]]
            b = encode_pairs(tok, [r["prompt"] for r in part], [r["response"] for r in part],
                             cfg.data.max_prompt_tokens, cfg.generation.max_new_tokens,
                             fmt).to(device)
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                           position_ids=b.position_ids).logits[:, b.prompt_len - 1:-1]
            target = b.input_ids[:, b.prompt_len:]
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none")
            mask = b.response_mask.reshape(-1).float()
            loss = (ce * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss))
        if progress:
            print(f"sft epoch {epoch + 1}/{cfg.sft.epochs} | loss {np.mean(losses):.3f} | "
                  f"{time.time() - t0:.0f}s", flush=True)
    out = save_model(model, tok, out_dir)

    locations.write_text(locations.join(out, "sft_stats.json"), json.dumps(
        {"loss": float(np.mean(losses)), "examples": len(rows), "seconds": time.time() - t0}))
    return out


class SFTTask:
    """SFT as an actor (see the module docstring)."""

    def run(self, cfg: LLMConfig, out: str) -> str:
        return run_sft(cfg, out, progress=True, device=cfg.placement.devices()["sft"])
