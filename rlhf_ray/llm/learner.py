"""The PPO learner group for language models: N ranks of torch.distributed with DDP.

Each rank holds the policy and the critic (both wrapped in DDP when N > 1) and the frozen
reference, and receives its shard of every rollout batch from the controller. A step makes
the experience (old log-probs, reference log-probs, values, KL-penalized token rewards, GAE)
and runs PPO epochs over minibatches with gradient accumulation over micro batches.

With a critic-free estimator (`ppo.advantage_estimator`: GRPO, Dr. GRPO, RLOO, REINFORCE++)
there is no critic at all (no model, optimizer, value loss or checkpoint folder): the
controller sends scores already shaped by their group baseline (`advantages.shape_scores`)
and each rank makes token advantages of its own rows. With the KL as a loss term
(`ppo.kl.placement=loss`) the rewards carry no KL; with beta fixed at 0 there is no reference
model either.

Batch statistics are global, so N ranks with a shard each compute exactly what one rank with
the whole batch would: advantages are whitened with all-reduced moments, and each
minibatch's loss is a sum over its tokens divided by the token count of the whole minibatch
across ranks (DDP's gradient average then gives the global token mean).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import numpy as np
import ray
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from rlhf_ray.core import advantages, lm_ppo
from rlhf_ray.core.schedules import lr_factor
from rlhf_ray.llm.config import PPOConfig
from rlhf_ray.llm.experience import (
    CachedTrunk,
    Experience,
    Forward,
    make_experience,
    unwrap,
)
from rlhf_ray.llm.modeling import (
    TokenBatch,
    TokenValueModel,
    adapter_state_cpu,
    disable_dropout,
    load_policy,
    load_scalar_model,
    load_tokenizer,
    lora_on,
    make_batch,
    save_model,
    sequence_logprobs,
    state_dict_cpu,
    with_lora,
)
from rlhf_ray.llm.modeling import train_top_layers as freeze_below
from rlhf_ray.runtime.cluster import free_port
from rlhf_ray.runtime.devices import actor_device
from rlhf_ray.storage import locations


class PPOLearner:
    def __init__(self, rank: int, world_size: int, policy_path: str, critic_path: str,
                 ppo: dict, *, temperature: float = 1.0, seed: int = 0, torch_threads: int = 1,
                 dtype: str = "float32", device: str | None = None, pad_id: int = 0,
                 ref_path: str | None = None, state_path: str | None = None,
                 lora: dict | None = None, adapter_path: str | None = None,
                 gradient_checkpointing: bool = False, train_top_layers: int | None = None,
                 iterations: int | None = None, max_new_tokens: int | None = None,
                 ptx_ids: list[list[int]] | None = None):
        """policy_path: the policy to train (the SFT model, or a checkpoint's policy);
        ref_path: the frozen reference (always the SFT model; default policy_path);
        state_path: a checkpoint's optimizer.pt to continue from. With `lora` (the
        `model.lora` section), policy_path is the base (the SFT model), the policy trains
        adapters on it (`adapter_path`: a checkpoint's), and the reference is the same model
        with its adapters off: no second copy. `iterations`: the run's PPO iterations (the
        learning-rate schedule's length); `max_new_tokens`: the generation limit (Dr. GRPO's
        constant loss normalizer); `ptx_ids`: the pretraining mix's token ids, with
        `ppo.ptx_coef` > 0 (PPO-ptx)."""
        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        self.rank, self.world = rank, world_size
        self.cfg = PPOConfig.model_validate(ppo)
        self.iterations = iterations or 1
        est = self.cfg.advantage_estimator
        self.agg = advantages.default_agg(est) if self.cfg.loss_agg == "auto" else \
            self.cfg.loss_agg
        self.norm_len = max_new_tokens or 1
        kl = self.cfg.kl
        # beta fixed at 0: the KL never enters, so no reference (TRL's GRPO default)
        self.needs_ref = not (kl.controller == "fixed" and kl.init_coef == 0)
        self.device = actor_device(device, f"learner rank {rank}")
        self.pad_id = pad_id
        self.lora = lora if lora_on(lora) else None
        self.policy = with_lora(load_policy(policy_path, dtype, self.device), self.lora,
                                adapter_path, top=train_top_layers)
        if not self.lora:
            freeze_below(self.policy, train_top_layers)
        self.ref = None if (self.lora or not self.needs_ref) else (
            load_policy(ref_path or policy_path, dtype, self.device).eval().requires_grad_(False))
        critic = None
        if est == "gae":
            critic = load_scalar_model(critic_path, dtype, self.device)
            freeze_below(critic, train_top_layers)
        if gradient_checkpointing:  # activations recomputed in backward: memory for time
            for model in (self.policy, critic):
                if model is not None:
                    model.gradient_checkpointing_enable(
                        gradient_checkpointing_kwargs={"use_reentrant": False})
        self.critic = None
        if critic is not None:
            bias = locations.join(critic_path, TokenValueModel.BIAS_FILE)
            self.critic = TokenValueModel(critic, json.loads(locations.read_text(bias))[
                "value_bias"] if locations.exists(bias) else 0.0)
        for model in (self.policy, self.critic, self.ref):  # old and new log-probs alike
            if model is not None:
                disable_dropout(model)
        self.policy.config.use_cache = False
        # how the models run: the frozen trunk below the trained blocks once per iteration
        # (`ppo.cache_frozen_blocks`), or every block in every pass
        self.forward = (CachedTrunk.for_models(self.policy, self.critic, train_top_layers,
                                               temperature, rank)
                        if train_top_layers and self.cfg.cache_frozen_blocks
                        else Forward(temperature))
        self.rng = np.random.default_rng(seed + 7919 * rank)
        self.ptx_ids = ptx_ids if self.cfg.ptx_coef > 0 and ptx_ids else None
        self.version = 0
        self._ddp = False
        self._state_path = state_path
        self._opts()

    def _opts(self) -> None:
        self.opt = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad],
                                     lr=self.cfg.lr)
        self.critic_opt = None if self.critic is None else torch.optim.AdamW(
            [p for p in self.critic.parameters() if p.requires_grad], lr=self.cfg.critic_lr)
        if self._state_path and locations.exists(self._state_path):  # resuming: same moments
            state = torch.load(locations.local_file(self._state_path), map_location=self.device,
                               weights_only=True)
            self.opt.load_state_dict(state["opt"])
            if self.critic_opt is not None:
                self.critic_opt.load_state_dict(state["critic_opt"])
            for o, lr in self._optimizers():
                for g in o.param_groups:  # the config's rates win (a sweep may have changed them)
                    g["lr"] = lr
            self.version = int(state["version"])

    def _optimizers(self) -> list[tuple[torch.optim.Optimizer, float]]:
        """(optimizer, its configured learning rate): the policy's, and the critic's if any."""
        return [(self.opt, self.cfg.lr)] + ([] if self.critic_opt is None else
                                            [(self.critic_opt, self.cfg.critic_lr)])

    def _models(self) -> list:
        """The trained models: the policy, and the critic if any."""
        return [self.policy] + ([] if self.critic is None else [self.critic])

    # ---------------------------------------------------------------- distributed
    def address(self) -> tuple[str, int]:
        """Rank 0 names the rendezvous (its node IP and a free port)."""
        return ray.util.get_node_ip_address(), free_port("")  # any interface: other nodes

    def init_group(self, master_addr: str, master_port: int, backend: str = "auto") -> int:
        if self.world == 1:
            return 1
        if backend == "auto":
            backend = "nccl" if self.device.startswith("cuda") else "gloo"
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master_addr, str(master_port)
        dist.init_process_group(backend, rank=self.rank, world_size=self.world)
        ids = [torch.device(self.device)] if self.device.startswith("cuda") else None
        # no buffer broadcast: the models' buffers (rotary frequencies) never change, and a
        # broadcast in every forward would make the ranks' forward counts a collective, which
        # token-budget micro batches (a different number per rank) would break
        self.policy = DDP(self.policy, device_ids=ids, broadcast_buffers=False)
        if self.critic is not None:
            self.critic = DDP(self.critic, device_ids=ids, broadcast_buffers=False)
        self._ddp = True
        self._opts()
        return dist.get_world_size()

    def _allreduce(self, *xs: float) -> list[float]:
        t = torch.tensor(xs, dtype=torch.float64)
        if self._ddp:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu().tolist()

    # ---------------------------------------------------------------- experience
    def _batch(self, shard: dict) -> TokenBatch:
        return make_batch(shard["prompt_ids"], shard["response_ids"], self.pad_id,
                          prompt_len=shard.get("prompt_len"),
                          response_len=shard.get("response_len")).to(self.device)

    def _experience(self, b: TokenBatch, scores: torch.Tensor, beta: float,
                    sampler_logprobs: list[list[float]] | None = None) -> Experience:
        """This rank's shard made ready for PPO epochs (`experience.make_experience`)."""
        return make_experience(self.forward, unwrap(self.policy),
                               None if self.critic is None else unwrap(self.critic), self.ref,
                               b, scores, beta, self.cfg,
                               lambda idx: self._micro_batches(b, idx), sampler_logprobs,
                               self._allreduce, needs_ref=self.needs_ref)

    # ---------------------------------------------------------------- the PPO step
    def _minibatch_loss(self, b: TokenBatch, exp: Experience, idx: np.ndarray,
                        tokens_global: float, seqs_global: float, beta: float,
                        ) -> tuple[torch.Tensor, dict]:
        sub = b.select(idx)
        m, cols = sub.trimmed(), sub.kept_columns()  # this micro batch's own padding only
        trunk = {role: (None if exp.trunk(role) is None or not self.forward.blocks[role]
                        else exp.trunk(role)[torch.as_tensor(idx)][:, cols])
                 for role in ("policy", "critic")}
        mask, t = m.response_mask, m.response_mask.shape[1]
        old_lp, adv, old_values, returns, ref_lp = (
            x[idx, :t] for x in (exp.old_lp, exp.adv, exp.values, exp.returns, exp.ref_lp))
        is_w = None if exp.is_weights is None else exp.is_weights[idx, :t]
        want_ent = self.cfg.entropy_coef > 0
        out = self.forward.logprobs(self.policy, m, trunk["policy"], want_ent)
        lp, ent = (out if want_ent else (out, None))
        # each token's share of the whole minibatch's loss (all micro batches, all ranks:
        # `ppo.loss_agg`), times world size because DDP averages gradients over ranks
        weights = advantages.agg_weights(mask, self.agg, seqs_global, tokens_global,
                                         self.norm_len) * self.world
        pg, pg_stats = lm_ppo.policy_loss(lp, old_lp, adv, mask, self.cfg.cliprange, is_w,
                                          token_weights=weights)
        # the rows report this micro batch's token mean; the other terms are token means
        # over the whole minibatch, as the policy loss was before ppo.loss_agg
        scale = float(mask.sum()) / tokens_global * self.world
        loss = pg
        stats = {"pg_loss": pg_stats.pop("pg_loss_token_mean"), **pg_stats}
        if self.critic is not None:
            values = self.forward.values(self.critic, m, trunk["critic"])
            vf, vf_stats = lm_ppo.value_loss(values, old_values, returns, mask,
                                             self.cfg.cliprange_value)
            loss = loss + vf * scale
            stats.update(vf_loss=float(vf.detach()), **vf_stats)
        if self.cfg.kl.placement == "loss" and self.needs_ref and beta:
            kl = advantages.kl_loss(lp, ref_lp, mask, self.cfg.kl.estimator,
                                    self.cfg.kl.loss_clamp)
            loss = loss + beta * kl * scale
            stats["kl_loss"] = float(kl.detach())
        if ent is not None:
            loss = loss - self.cfg.entropy_coef * lm_ppo.masked_mean(ent, mask) * scale
        return loss, stats

    def _text_nll(self, model, rows: list[list[int]]) -> tuple[torch.Tensor, int]:
        """The summed negative log-likelihood of each row's tokens after its first (at
        temperature 1: the language model itself), and how many tokens that is: each row
        laid out as a one-token prompt and the rest as its response."""
        b = make_batch([r[:1] for r in rows], [r[1:] for r in rows], self.pad_id)
        return -sequence_logprobs(model, b.to(self.device)).sum(), sum(len(r) - 1 for r in rows)

    def _ptx_backward(self) -> dict:
        """PPO-ptx (InstructGPT): `ppo.ptx_coef` times the mean token NLL of a batch of the
        pretraining mix, its gradient added to the minibatch's (each rank its share of
        `ppo.ptx_batch_size` texts; DDP averages the ranks')."""
        n = max(1, self.cfg.ptx_batch_size // self.world)
        rows = [self.ptx_ids[i] for i in self.rng.integers(0, len(self.ptx_ids), n)]
        nll, tokens = self._text_nll(self.policy, rows)
        ptx = nll / max(tokens, 1)
        (self.cfg.ptx_coef * ptx).backward()
        return {"ptx_loss": float(ptx.detach())}

    def text_nll(self, rows: list[list[int]], batch: int = 16) -> tuple[float, int]:
        """(summed NLL, tokens) of held-out text under the policy as it is now: the
        alignment tax's perplexity is exp(sum / tokens)."""
        total, count = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(rows), batch):
                nll, n = self._text_nll(unwrap(self.policy), rows[s:s + batch])
                total, count = total + float(nll), count + n
        return total, count

    def _micro_batches(self, b: TokenBatch, idx: np.ndarray) -> list[np.ndarray]:
        """`ppo.micro_batch_size` rows at a time, or as many as `ppo.micro_batch_tokens`
        holds (lengths differ: memory follows tokens, see `lm_ppo.micro_batches`)."""
        return lm_ppo.micro_batches(idx, *b.lengths(), self.cfg.micro_batch_size,
                                    self.cfg.micro_batch_tokens)

    def _backward(self, b: TokenBatch, exp: Experience, idx: np.ndarray,
                  beta: float) -> list[dict]:
        """Accumulate the gradients of one minibatch (this rank's part, `idx`)."""
        tokens_global, seqs_global = self._allreduce(float(b.response_mask[idx].sum()),
                                                     float(len(idx)))
        micros = self._micro_batches(b, idx)
        stats = []
        ptx = {}
        if self.ptx_ids:  # gradients synced with the last micro batch's
            with self._no_sync([self.policy]):
                ptx = self._ptx_backward()
        for k, micro in enumerate(micros):
            last = k == len(micros) - 1
            with self._no_sync([] if last else self._models()):
                loss, s = self._minibatch_loss(b, exp, micro, tokens_global, seqs_global, beta)
                loss.backward()
            stats.append({**s, **ptx})
        return stats

    def _no_sync(self, models: list) -> contextlib.ExitStack:
        """Gradients accumulate locally for `models` (DDP's no_sync; nothing without DDP)."""
        stack = contextlib.ExitStack()
        for m in models if self._ddp else []:
            stack.enter_context(m.no_sync())
        return stack

    def step(self, shard: dict, beta: float) -> dict:
        """One PPO iteration on this rank's shard: {prompt_ids, response_ids, scores
        (normalized RM scores), prompt_len, response_len, and optionally sampler_logprobs
        (the sampling policy's, from generation)}. All ranks call it together."""
        t0 = time.time()
        for model in self._models():
            model.train()
        lr_scale = lr_factor(self.version, self.iterations, self.cfg.lr_warmup_iterations,
                             self.cfg.lr_schedule)  # resumed runs: the version says where
        for opt, lr in self._optimizers():
            for g in opt.param_groups:
                g["lr"] = lr * lr_scale
        b = self._batch(shard)
        scores = torch.as_tensor(shard["scores"], dtype=torch.float32, device=self.device)
        exp = self._experience(b, scores, beta, shard.get("sampler_logprobs"))
        n = len(b)
        per_rank_mb = self.cfg.minibatch_size // self.world
        stats: list[dict] = []
        for _ in range(self.cfg.ppo_epochs):
            perm = self.rng.permutation(n)
            for s in range(0, n, per_rank_mb):
                idx = perm[s:s + per_rank_mb]
                for opt, _ in self._optimizers():
                    opt.zero_grad(set_to_none=True)
                stats += self._backward(b, exp, idx, beta)
                if self.cfg.max_grad_norm:
                    for model in self._models():
                        torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm)
                for opt, _ in self._optimizers():
                    opt.step()
        self.version += 1
        mask = b.response_mask.to(torch.float32)
        kl_seq = exp.kl.sum(1)
        ref_kl_seq = (exp.old_lp - exp.ref_lp).mul(mask).sum(1)
        tot = self._allreduce(float(kl_seq.sum()), float(ref_kl_seq.sum()), float(n),
                              float(mask.sum()), float(exp.rewards.sum()))
        out = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]} if stats else {}
        out.update(kl_mean=tot[0] / tot[2], kl_k1_mean=tot[1] / tot[2],
                   response_len_mean=tot[3] / tot[2], reward_total_mean=tot[4] / tot[2],
                   learner_s=time.time() - t0, policy_version=self.version,
                   lr=self.cfg.lr * lr_scale)
        if exp.sampler_stats:  # this rank's (a per-token mean: close to the global one)
            out.update(exp.sampler_stats)
        return out

    # ---------------------------------------------------------------- for tests and syncs
    def gradients(self, shard: dict, beta: float) -> dict[str, np.ndarray]:
        """The gradients of one minibatch holding this whole shard (no optimizer step):
        2 ranks with half a batch each must match 1 rank with all of it."""
        b = self._batch(shard)
        scores = torch.as_tensor(shard["scores"], dtype=torch.float32, device=self.device)
        exp = self._experience(b, scores, beta, shard.get("sampler_logprobs"))
        for opt, _ in self._optimizers():
            opt.zero_grad(set_to_none=True)
        self._backward(b, exp, np.arange(len(b)), beta)
        out = {}
        for prefix, model in zip(("policy.", "critic."), self._models()):
            for name, p in unwrap(model).named_parameters():
                if p.grad is not None:
                    out[prefix + name] = p.grad.detach().cpu().numpy().copy()
        return out

    def get_version(self) -> int:
        return self.version

    def policy_weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        """What the generation workers load: the whole state dict, or with LoRA the adapters."""
        if self.lora:
            return self.version, adapter_state_cpu(self.policy)
        return self.version, state_dict_cpu(self.policy)

    def put_policy_weights(self) -> tuple[int, list]:
        """`policy_weights` into this process's object store: (version, [ObjectRef]) (a
        list, so the caller gets the reference, not the weights through its own process)."""
        version, weights = self.policy_weights()
        return version, [ray.put(weights)]

    def save(self, out_dir: str, tokenizer_path: str | None = None) -> dict:
        tok = load_tokenizer(tokenizer_path) if tokenizer_path else None
        policy = unwrap(self.policy)
        with locations.writable_dir(out_dir) as local:  # uploaded at the end where remote
            if self.lora:  # the adapters (to resume from) and the merged policy (to use)
                import copy

                policy.save_pretrained(os.path.join(local, "policy_adapter"))
                policy = copy.deepcopy(policy).merge_and_unload()
            save_model(policy, tok, os.path.join(local, "policy"))
            state = {"opt": self.opt.state_dict(), "version": self.version}
            if self.critic is not None:
                critic = unwrap(self.critic)
                save_model(critic.model, tok, os.path.join(local, "critic"))
                with open(os.path.join(local, "critic", TokenValueModel.BIAS_FILE), "w") as f:
                    json.dump({"value_bias": float(critic.value_bias)}, f)
                state["critic_opt"] = self.critic_opt.state_dict()
            torch.save(state, os.path.join(local, "optimizer.pt"))
        out = {"policy": locations.join(out_dir, "policy")}
        if self.critic is not None:
            out["critic"] = locations.join(out_dir, "critic")
        return out

    def fold_reward_normalization(self, mean: float, std: float) -> None:
        """The critic, started from the reward model, predicts normalized scores (every rank
        alike, before the first step: DDP's copies stay equal). No critic: nothing to do."""
        if self.critic is not None:
            unwrap(self.critic).fold_normalization(mean, std)

    def close(self) -> None:
        if self._ddp and dist.is_initialized():
            dist.destroy_process_group()
