"""The LLM reward model's trainer: an LM backbone with a scalar head, fitted to rankings.

Labels arrive as the labeler drains them: pairwise comparisons tagged with the ranking they
came from. All pairs of one prompt go into the same batch and the prompt's K responses are
scored in one forward pass; the loss per prompt is normalized by its number of pairs
(InstructGPT, section 3.5: C(K,2) comparisons of one prompt are highly correlated, and
shuffling them across batches overfits). A held-out fraction of prompts measures accuracy.
Runs as its own actor so reward-model training overlaps generation and PPO.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from rlhf_ray.core.bradley_terry import grouped_preference_loss
from rlhf_ray.llm.config import RewardModelConfig
from rlhf_ray.llm.modeling import (
    encode_pairs,
    last_token_scores,
    load_scalar_model,
    load_tokenizer,
    save_model,
    state_dict_cpu,
)
from rlhf_ray.llm.modeling import train_top_layers as freeze_below
from rlhf_ray.runtime.actors import torch_threads
from rlhf_ray.runtime.devices import actor_device
from rlhf_ray.storage.weights import Publishes


def rankings_to_comparisons(rankings: list[dict]) -> list[dict]:
    """[{prompt, responses best first}] -> the pairwise comparisons the labeler drains."""
    out = []
    for n, r in enumerate(rankings):
        resp = r["responses"]
        for i in range(len(resp)):
            for j in range(i + 1, len(resp)):
                out.append({"prompt": r["prompt"], "left": resp[i], "right": resp[j],
                            "mu": float(r.get("mu", 1.0)),
                            "ranking_id": r.get("ranking_id", f"file-{n}")})
    return out


class LMRewardTrainer(Publishes):
    def __init__(self, init_path: str, cfg: RewardModelConfig, *, max_prompt_tokens: int = 64,
                 max_response_tokens: int = 64, seed: int = 0, torch_threads: int = 1,
                 dtype: str = "float32", device: str | None = None,
                 train_top_layers: int | None = None):
        """`device`: the placement's (`placement.devices()`); None: CUDA where visible."""
        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        device = actor_device(device, "the reward trainer")
        self.cfg = cfg
        self.tok = load_tokenizer(init_path)
        self.model = load_scalar_model(init_path, dtype, device)
        self.model.config.pad_token_id = self.tok.pad_token_id

        freeze_below(self.model, train_top_layers)
        self.device = device
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                     lr=cfg.lr)
        self.rng = np.random.default_rng(seed)
        self.max_prompt, self.max_response = max_prompt_tokens, max_response_tokens
        self.groups: dict[str, dict] = {}  # ranking id -> {prompt, responses, pairs, val}
        self.version = 0
        self.steps = 0

    # ---------------------------------------------------------------- data
    def add(self, comparisons: list[dict]) -> int:
        """Add drained comparisons ({prompt, left, right, mu, ranking_id}); returns how many
        prompts (groups) the trainer holds."""
        for c in comparisons:
            gid = c.get("ranking_id") or f"pair-{len(self.groups)}-{self.rng.integers(1 << 62)}"
            g = self.groups.get(gid)
            if g is None:
                g = self.groups[gid] = {"prompt": c["prompt"], "responses": [], "pairs": [],
                                        "val": bool(self.rng.random() < self.cfg.val_fraction)}
            idx = []
            for side in ("left", "right"):  # a response is (its text, whether it ended)
                resp = (c[side], bool(c.get(f"{side}_finished", True)))
                if resp not in g["responses"]:
                    g["responses"].append(resp)
                idx.append(g["responses"].index(resp))
            g["pairs"].append((idx[0], idx[1], float(c["mu"])))
        if self.groups and all(g["val"] for g in self.groups.values()):
            next(iter(self.groups.values()))["val"] = False  # always something to train on
        return len(self.groups)

    def replace(self, comparisons: list[dict]) -> int:
        """Drop every comparison and add these (the labeler restarted: the store is the whole
        data set). A ranking keeps the train / validation side it was given, so nothing
        trained on becomes validation data."""
        side = {gid: g["val"] for gid, g in self.groups.items()}
        self.groups = {}
        n = self.add(comparisons)
        for gid, g in self.groups.items():
            g["val"] = side.get(gid, g["val"])
        return n

    def _forward(self, groups: list[dict]):
        prompts, responses, left, right, mu, gidx = [], [], [], [], [], []
        for n, g in enumerate(groups):
            base = len(responses)
            prompts += [g["prompt"]] * len(g["responses"])
            responses += g["responses"]  # (text, ended): a cut one gets no EOS
            for i, j, m in g["pairs"]:
                left.append(base + i)
                right.append(base + j)
                mu.append(m)
                gidx.append(n)
        batch = encode_pairs(self.tok, prompts, [r[0] for r in responses], self.max_prompt,
                             self.max_response, finished=[r[1] for r in responses]
                             ).to(self.device)
        scores = last_token_scores(self.model, batch.input_ids, batch.attention_mask,
                                   batch.position_ids)
        t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=self.device)  # noqa: E731
        return scores, t(left), t(right), t(mu, torch.float32), t(gidx)

    # ---------------------------------------------------------------- training
    def train(self, steps: int | None = None, epochs: int | None = None,
              threads: int | None = None) -> dict:
        """`steps` gradient steps (default: `steps_per_round`), or `epochs` passes over the
        training prompts. Returns loss, accuracy on held-out prompts and the new version.
        `threads`: torch threads for this call only (the first fit runs alone; 0: this
        node's cores)."""
        if threads is not None:
            with torch_threads(threads):
                return self.train(steps, epochs)
        train = [g for g in self.groups.values() if not g["val"]]
        if not train:
            return {"rm_train_loss": float("nan"), "rm_val_accuracy": float("nan"),
                    "rm_version": self.version}
        t0 = time.time()
        bs = min(self.cfg.batch_size, len(train))
        if epochs is not None:
            steps = epochs * max(1, len(train) // bs)
        steps = self.cfg.steps_per_round if steps is None else steps
        self.model.train()
        losses = []
        for _ in range(steps):
            pick = self.rng.choice(len(train), size=bs, replace=False)
            scores, left, right, mu, gidx = self._forward([train[i] for i in pick])
            loss = grouped_preference_loss(scores, left, right, mu, gidx)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            losses.append(float(loss.detach()))
            self.steps += 1
        if steps:
            self.version += 1
        return {"rm_train_loss": float(np.mean(losses)) if losses else float("nan"),
                "rm_val_accuracy": self.accuracy(val=True), "rm_version": self.version,
                "rm_train_s": time.time() - t0, "rm_prompts": len(self.groups)}

    @torch.no_grad()
    def accuracy(self, val: bool = True) -> float:
        groups = [g for g in self.groups.values() if g["val"] == val][:self.cfg.val_max]
        if not groups:
            return float("nan")
        self.model.eval()
        right_n, total = 0, 0
        for s in range(0, len(groups), 64):
            scores, left, right, mu, _ = self._forward(groups[s:s + 64])
            strict = mu != 0.5  # soft labels count by the side they favour
            pred = scores[left] > scores[right]
            right_n += int((pred[strict] == (mu[strict] > 0.5)).sum())
            total += int(strict.sum())
        return right_n / total if total else float("nan")

    # ---------------------------------------------------------------- publishing
    def weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        """What a refit changed: the trainable parameters (all of them, or with
        `model.train_top_layers` the top blocks and the head); the replica keeps the rest."""
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        full = state_dict_cpu(self.model)
        return self.version, {k: v for k, v in full.items() if k in trainable} or full

    def set_version(self, version: int) -> int:
        """Continue numbering from a checkpoint's reward-model version."""
        self.version = max(self.version, int(version))
        return self.version

    def save(self, out_dir: str) -> str:
        return save_model(self.model, self.tok, out_dir)
