"""The PPO learner group for language models: N ranks of torch.distributed with DDP.

Each rank holds the policy and the critic (both wrapped in DDP when N > 1) and the frozen
reference, and receives its shard of every rollout batch from the controller. A step makes
the experience (old log-probs, reference log-probs, values, KL-penalized token rewards, GAE)
and runs PPO epochs over minibatches with gradient accumulation over micro batches.

Batch statistics are global, so N ranks with a shard each compute exactly what one rank with
the whole batch would: advantages are whitened with all-reduced moments, and each
minibatch's loss is a sum over its tokens divided by the token count of the whole minibatch
across ranks (DDP's gradient average then gives the global token mean).
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import torch
import torch.distributed as dist

from rlhf_ray import storage
from rlhf_ray.config import LMPPOConfig
from rlhf_ray.core import lm_ppo
from rlhf_ray.llm.modeling import (TokenBatch, TokenValueModel, adapter_state_cpu,
                                   decoder_layers, load_policy, load_scalar_model, lora_on,
                                   make_batch, only_blocks, response_logprobs, response_values,
                                   save_model, state_dict_cpu, train_top_layers as freeze_below,
                                   trunk_states, with_lora)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class PPOLearner:
    def __init__(self, rank: int, world_size: int, policy_path: str, critic_path: str,
                 ppo: dict, temperature: float = 1.0, seed: int = 0, torch_threads: int = 1,
                 dtype: str = "float32", device: str | None = None, pad_id: int = 0,
                 ref_path: str | None = None, state_path: str | None = None,
                 lora: dict | None = None, adapter_path: str | None = None,
                 gradient_checkpointing: bool = False, train_top_layers: int | None = None):
        """policy_path: the policy to train (the SFT model, or a checkpoint's policy);
        ref_path: the frozen reference (always the SFT model; default policy_path);
        state_path: a checkpoint's optimizer.pt to continue from. With `lora` (the
        `model.lora` section), policy_path is the base (the SFT model), the policy trains
        adapters on it (`adapter_path`: a checkpoint's), and the reference is the same model
        with its adapters off: no second copy."""
        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        self.rank, self.world = rank, world_size
        self.cfg = LMPPOConfig.model_validate(ppo)
        self.device = device or (f"cuda:{torch.cuda.current_device()}"
                                 if torch.cuda.is_available() else "cpu")
        self.temperature = temperature
        self.pad_id = pad_id
        self.lora = lora if lora_on(lora) else None
        self.policy = with_lora(load_policy(policy_path, dtype, self.device), self.lora,
                                adapter_path, top=train_top_layers)
        if not self.lora:
            freeze_below(self.policy, train_top_layers)
        self.ref = None if self.lora else (
            load_policy(ref_path or policy_path, dtype, self.device).eval().requires_grad_(False))
        critic = load_scalar_model(critic_path, dtype, self.device)
        freeze_below(critic, train_top_layers)
        if gradient_checkpointing:  # activations recomputed in backward: memory for time
            self.policy.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            critic.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.critic = TokenValueModel(critic)
        self.policy.config.use_cache = False
        # The frozen trunk: blocks below the trained ones run once per iteration, not per epoch
        self.trunk = {"policy": 0, "critic": 0}
        if train_top_layers and self.cfg.cache_frozen_blocks:
            for role, model in (("policy", self.policy), ("critic", self.critic)):
                self.trunk[role] = max(0, len(decoder_layers(model)[1]) - train_top_layers)
        self._trunk_checked = False
        self.rng = np.random.default_rng(seed + 7919 * rank)
        self.version = 0
        self._ddp = False
        self._state_path = state_path
        self._opts()

    def _opts(self) -> None:
        self.opt = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad],
                                     lr=self.cfg.lr)
        self.critic_opt = torch.optim.AdamW([p for p in self.critic.parameters() if p.requires_grad],
                                            lr=self.cfg.critic_lr)
        if self._state_path and storage.exists(self._state_path):  # resuming: same moments
            state = torch.load(storage.local_file(self._state_path), map_location=self.device,
                               weights_only=True)
            self.opt.load_state_dict(state["opt"])
            self.critic_opt.load_state_dict(state["critic_opt"])
            for o, lr in ((self.opt, self.cfg.lr), (self.critic_opt, self.cfg.critic_lr)):
                for g in o.param_groups:  # the config's rates win (a sweep may have changed them)
                    g["lr"] = lr
            self.version = int(state["version"])

    # ---------------------------------------------------------------- distributed
    def address(self) -> tuple[str, int]:
        """Rank 0 names the rendezvous (its node IP and a free port)."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def init_group(self, master_addr: str, master_port: int, backend: str = "auto") -> int:
        if self.world == 1:
            return 1
        if backend == "auto":
            backend = "nccl" if self.device.startswith("cuda") else "gloo"
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master_addr, str(master_port)
        dist.init_process_group(backend, rank=self.rank, world_size=self.world)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [torch.device(self.device)] if self.device.startswith("cuda") else None
        # no buffer broadcast: the models' buffers (rotary frequencies) never change, and a
        # broadcast in every forward would make the ranks' forward counts a collective, which
        # token-budget micro batches (a different number per rank) would break
        self.policy = DDP(self.policy, device_ids=ids, broadcast_buffers=False)
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

    def _whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(x.dtype)
        s, n = self._allreduce(float((x * m).sum()), float(m.sum()))
        mean = s / max(n, 1.0)
        (ss,) = self._allreduce(float((((x - mean) ** 2) * m).sum()))
        var = ss / max(n, 1.0)
        return (x - mean) / float(np.sqrt(var + 1e-8)) * m

    # ---------------------------------------------------------------- experience
    def _batch(self, shard: dict) -> TokenBatch:
        return make_batch(shard["prompt_ids"], shard["response_ids"], self.pad_id,
                          prompt_len=shard.get("prompt_len"),
                          response_len=shard.get("response_len")).to(self.device)

    # ---------------------------------------------------------------- forward passes
    def _logprobs(self, model, m: TokenBatch, trunk: torch.Tensor | None, with_entropy=False):
        """The policy's (or, adapters off, the reference's) response log-probs for micro batch
        `m`; from the cached output of its frozen blocks when `trunk` is given."""
        args = (m.input_ids, m.attention_mask, m.position_ids, m.prompt_len, self.temperature,
                with_entropy)
        if trunk is None:
            return response_logprobs(model, *args)
        with only_blocks(self._unwrap(model), slice(self.trunk["policy"], None)):
            return response_logprobs(model, *args, inputs_embeds=trunk)

    def _values(self, critic, m: TokenBatch, trunk: torch.Tensor | None) -> torch.Tensor:
        """The critic's values for micro batch `m` (`critic`: the DDP-wrapped one to train, the
        bare one for experience, whose passes need no collectives)."""
        args = (m.input_ids, m.attention_mask, m.position_ids, m.prompt_len)
        if trunk is None:
            return response_values(critic, *args)
        with only_blocks(self._unwrap(critic), slice(self.trunk["critic"], None)):
            return response_values(critic, *args, inputs_embeds=trunk)

    def _check_trunk(self, m: TokenBatch, trunks: dict) -> None:
        """Once per learner: the top blocks fed the cached trunk must give the full forward's
        log-probs and values (a model family that transforms `inputs_embeds`, as Gemma scales
        them, would not): else the cache turns itself off, with one line saying so."""
        self._trunk_checked = True
        modes = [(mod, mod.training) for mod in (self._unwrap(self.policy),
                                                   self._unwrap(self.critic))]
        for mod, _ in modes:  # no dropout: the two passes must be comparable
            mod.eval()
        try:
            self._compare_trunk(m, trunks)
        finally:
            for mod, training in modes:
                mod.train(training)

    def _compare_trunk(self, m: TokenBatch, trunks: dict) -> None:
        tol = 1e-3 if m.input_ids.device.type == "cpu" and next(
            self._unwrap(self.policy).parameters()).dtype == torch.float32 else 5e-2
        checks = {}
        policy, critic = self._unwrap(self.policy), self._unwrap(self.critic)
        if trunks["policy"] is not None:
            checks["policy"] = (self._logprobs(policy, m, None),
                                self._logprobs(policy, m, trunks["policy"]))
        if trunks["critic"] is not None:
            checks["critic"] = (self._values(critic, m, None),
                                self._values(critic, m, trunks["critic"]))
        for role, (full, cached) in checks.items():
            err = float((full.float() - cached.float()).abs().max())
            if not err <= tol:
                print(f"[learner {self.rank}] ppo.cache_frozen_blocks off for the {role}: "
                      f"its top blocks from the cached trunk differ from its full forward by "
                      f"{err:.2g}", flush=True)
                self.trunk[role] = 0
                trunks[role] = None

    @torch.no_grad()
    def _experience(self, b: TokenBatch, scores: torch.Tensor, beta: float,
                    old_logprobs: list[list[float]] | None = None) -> dict:
        """Old and reference log-probs, values, KL-penalized rewards, GAE. `old_logprobs`:
        the sampling policy's per-token log-probs from generation (else a forward pass
        here). With a frozen trunk (`ppo.cache_frozen_blocks`) its output is kept for the
        epochs: `trunk_policy`, `trunk_critic`, [B, P + T, H]."""
        policy = self._unwrap(self.policy)
        shape = b.response_mask.shape
        old_lp, ref_lp, values = (torch.zeros(shape, device=self.device) for _ in range(3))
        given = old_logprobs is not None  # the sampler's own (one forward pass fewer)
        if given:
            for i, x in enumerate(old_logprobs):
                old_lp[i, :min(len(x), shape[1])] = torch.as_tensor(x[:shape[1]])
        caches: dict[str, torch.Tensor | None] = {"policy": None, "critic": None}
        for idx in self._micro_batches(b, np.arange(len(b))):
            sub = b.select(idx)
            m, cols = sub.trimmed(), sub.kept_columns()
            t = m.response_mask.shape[1]
            args = (m.input_ids, m.attention_mask, m.position_ids)
            trunks = {}
            for role, model in (("policy", policy), ("critic", self._unwrap(self.critic))):
                k = self.trunk[role]
                trunks[role] = trunk_states(model, k, *args) if k else None
            if not self._trunk_checked:
                self._check_trunk(m, trunks)
            for role, h in trunks.items():
                if h is not None:
                    if caches[role] is None:
                        caches[role] = h.new_zeros((len(b), b.input_ids.shape[1], h.shape[-1]))
                    caches[role][torch.as_tensor(idx)[:, None],
                                 torch.arange(cols.start, cols.stop)[None, :]] = h
            if not given:
                old_lp[idx, :t] = self._logprobs(policy, m, trunks["policy"])
            if self.ref is None:  # LoRA: the reference is the base, adapters off
                with policy.disable_adapter():
                    ref_lp[idx, :t] = self._logprobs(policy, m, trunks["policy"])
            else:  # its own blocks throughout (a second copy; the trunk is the policy's)
                ref_lp[idx, :t] = response_logprobs(self.ref, *args, m.prompt_len,
                                                    self.temperature)
            values[idx, :t] = self._values(self._unwrap(self.critic), m, trunks["critic"]).float()
        mask = b.response_mask
        kl = lm_ppo.kl_estimate(old_lp, ref_lp, self.cfg.kl.estimator) * mask
        rewards = lm_ppo.token_rewards(scores, kl, beta, mask)
        adv, returns = lm_ppo.gae(rewards, values, mask, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:
            adv = self._whiten(adv, mask)
        return {"old_lp": old_lp, "ref_lp": ref_lp, "values": values, "adv": adv,
                "returns": returns, "kl": kl, "rewards": rewards,
                "trunk_policy": caches["policy"], "trunk_critic": caches["critic"]}

    @staticmethod
    def _unwrap(m):
        return getattr(m, "module", m)

    # ---------------------------------------------------------------- the PPO step
    def _minibatch_loss(self, b: TokenBatch, exp: dict, idx: np.ndarray, tokens_global: float,
                        sync: bool) -> tuple[torch.Tensor, dict]:
        sub = b.select(idx)
        m, cols = sub.trimmed(), sub.kept_columns()  # this micro batch's own padding only
        trunk = {role: (None if exp[f"trunk_{role}"] is None or not self.trunk[role]
                        else exp[f"trunk_{role}"][torch.as_tensor(idx)][:, cols])
                 for role in ("policy", "critic")}
        mask, t = m.response_mask, m.response_mask.shape[1]
        exp = {k: exp[k][idx, :t] for k in ("old_lp", "adv", "values", "returns")}
        want_ent = self.cfg.entropy_coef > 0
        out = self._logprobs(self.policy, m, trunk["policy"], want_ent)
        lp, ent = (out if want_ent else (out, None))
        values = self._values(self.critic, m, trunk["critic"])
        # per-token sums over this micro batch, divided by the whole minibatch's token count
        # on all ranks; times world size because DDP averages gradients over ranks
        scale = float(mask.sum()) / tokens_global * self.world
        pg, pg_stats = lm_ppo.policy_loss(lp, exp["old_lp"], exp["adv"], mask, self.cfg.cliprange)
        vf, vf_stats = lm_ppo.value_loss(values, exp["values"], exp["returns"], mask,
                                         self.cfg.cliprange_value)
        loss = pg + vf
        if ent is not None:
            loss = loss - self.cfg.entropy_coef * lm_ppo.masked_mean(ent, mask)
        stats = {"pg_loss": float(pg.detach()), "vf_loss": float(vf.detach()), **pg_stats, **vf_stats}
        return loss * scale, stats

    def _micro_batches(self, b: TokenBatch, idx: np.ndarray) -> list[np.ndarray]:
        """`ppo.micro_batch_size` rows at a time, or as many as `ppo.micro_batch_tokens`
        holds (lengths differ: memory follows tokens, see `lm_ppo.micro_batches`)."""
        return lm_ppo.micro_batches(idx, *b.lengths(), self.cfg.micro_batch_size,
                                    self.cfg.micro_batch_tokens)

    def _backward(self, b: TokenBatch, exp: dict, idx: np.ndarray) -> list[dict]:
        """Accumulate the gradients of one minibatch (this rank's part, `idx`)."""
        (tokens_global,) = self._allreduce(float(b.response_mask[idx].sum()))
        micros = self._micro_batches(b, idx)
        stats = []
        for k, micro in enumerate(micros):
            last = k == len(micros) - 1
            ctx = [m.no_sync() for m in (self.policy, self.critic)] if (self._ddp and not last) else []
            for c in ctx:
                c.__enter__()
            try:
                loss, s = self._minibatch_loss(b, exp, micro, tokens_global, last)
                loss.backward()
            finally:
                for c in ctx:
                    c.__exit__(None, None, None)
            stats.append(s)
        return stats

    def step(self, shard: dict, beta: float) -> dict:
        """One PPO iteration on this rank's shard: {prompt_ids, response_ids, scores
        (normalized RM scores), prompt_len, response_len, and optionally old_logprobs (the
        sampling policy's, from generation)}. All ranks call it together."""
        t0 = time.time()
        self.policy.train()
        self.critic.train()
        b = self._batch(shard)
        scores = torch.as_tensor(shard["scores"], dtype=torch.float32, device=self.device)
        exp = self._experience(b, scores, beta, shard.get("old_logprobs"))
        n = len(b)
        per_rank_mb = self.cfg.minibatch_size // self.world
        stats: list[dict] = []
        for _ in range(self.cfg.ppo_epochs):
            perm = self.rng.permutation(n)
            for s in range(0, n, per_rank_mb):
                idx = perm[s:s + per_rank_mb]
                self.opt.zero_grad(set_to_none=True)
                self.critic_opt.zero_grad(set_to_none=True)
                stats += self._backward(b, exp, idx)
                if self.cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm)
                    torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.cfg.max_grad_norm)
                self.opt.step()
                self.critic_opt.step()
        self.version += 1
        mask = b.response_mask.to(torch.float32)
        kl_seq = exp["kl"].sum(1)
        ref_kl_seq = (exp["old_lp"] - exp["ref_lp"]).mul(mask).sum(1)
        tot = self._allreduce(float(kl_seq.sum()), float(ref_kl_seq.sum()), float(n),
                              float(mask.sum()), float(exp["rewards"].sum()))
        out = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]} if stats else {}
        out.update(kl_mean=tot[0] / tot[2], kl_k1_mean=tot[1] / tot[2],
                   response_len_mean=tot[3] / tot[2], reward_total_mean=tot[4] / tot[2],
                   learner_s=time.time() - t0, policy_version=self.version)
        return out

    # ---------------------------------------------------------------- for tests and syncs
    def gradients(self, shard: dict, beta: float) -> dict[str, np.ndarray]:
        """The gradients of one minibatch holding this whole shard (no optimizer step):
        2 ranks with half a batch each must match 1 rank with all of it."""
        b = self._batch(shard)
        scores = torch.as_tensor(shard["scores"], dtype=torch.float32, device=self.device)
        exp = self._experience(b, scores, beta, shard.get("old_logprobs"))
        self.opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        self._backward(b, exp, np.arange(len(b)))
        out = {}
        for prefix, model in (("policy.", self.policy), ("critic.", self.critic)):  # noqa: B007
            for name, p in self._unwrap(model).named_parameters():
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
        import ray

        version, weights = self.policy_weights()
        return version, [ray.put(weights)]

    def save(self, out_dir: str, tokenizer_path: str | None = None) -> dict:
        from rlhf_ray.llm.modeling import load_tokenizer

        tok = load_tokenizer(tokenizer_path) if tokenizer_path else None
        policy = self._unwrap(self.policy)
        with storage.writable_dir(out_dir) as local:  # uploaded at the end where remote
            if self.lora:  # the adapters (to resume from) and the merged policy (to use)
                import copy

                policy.save_pretrained(os.path.join(local, "policy_adapter"))
                policy = copy.deepcopy(policy).merge_and_unload()
            save_model(policy, tok, os.path.join(local, "policy"))
            save_model(self._unwrap(self.critic).model, tok, os.path.join(local, "critic"))
            torch.save({"opt": self.opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                        "version": self.version}, os.path.join(local, "optimizer.pt"))
        return {"policy": storage.join(out_dir, "policy"),
                "critic": storage.join(out_dir, "critic")}

    def close(self) -> None:
        if self._ddp and dist.is_initialized():
            dist.destroy_process_group()
