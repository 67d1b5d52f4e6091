"""The controller of the LLM workload: InstructGPT's three steps on Ray, online.

`train(cfg)` runs SFT -> preferences on SFT samples -> reward model -> PPO with a KL penalty,
with preference collection continuing during PPO (iterative online RLHF). The stages also
run alone from files: `run_sft`, `run_rm`, `run_ppo` (`rlhf-ray sft | rm | ppo`).

Roles, each with the resources the config gives it:
  generation workers (HF `generate` or vLLM) -- sample responses, record the policy version;
  reward model (a Serve deployment, batched; weights swapped in place by version);
  PPO learner group (N torch.distributed ranks, DDP) -- driven step by step from here;
  labeler (the control workload's actor and store) -- the oracle or humans rank responses;
  reward trainer (its own actor) -- refits the reward model as labels arrive.

One iteration: prompts -> generate -> score (Serve) -> learner step on shards -> KL
controller -> push policy weights (version + 1) to the generation workers -> ask for labels
on fresh samples -> feed the reward trainer (asynchronously) -> metrics -> checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from rlhf_ray.config import LLMConfig, dump_config
from rlhf_ray.core.lm_ppo import AdaptiveKLController, FixedKLController
from rlhf_ray.llm import data as lm_data
from rlhf_ray.metrics import MetricsWriter
from rlhf_ray.roles import init_ray, llm_bundle_map, run_bundles
from rlhf_ray.serve_rm import retry_call
from rlhf_ray.roles import remote_role as _remote

CHECKPOINT_FORMAT = 1
METRIC_KEYS = ("iteration", "oracle_score_mean", "rm_score_mean", "kl_mean", "kl_coef",
               "response_len_mean", "tokens_per_s", "policy_version")


# ------------------------------------------------------------------------ helpers


def _oracle(cfg: LLMConfig):
    from rlhf_ray.labeler import load_text_oracle

    return load_text_oracle(cfg.labeler.oracle)


def _kl_controller(cfg: LLMConfig):
    k = cfg.ppo.kl
    if k.controller == "adaptive":
        return AdaptiveKLController(k.init_coef, k.target, k.horizon)
    return FixedKLController(k.init_coef)


def _done(ref) -> bool:
    import ray

    return bool(ray.wait([ref], timeout=0)[0])


def _f(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if not np.isfinite(x) else round(x, 6)


def run_name(cfg: LLMConfig) -> str:
    return cfg.run.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


# ------------------------------------------------------------------------ SFT


def run_sft(cfg: LLMConfig, out_dir: str, progress: bool = False) -> str:
    """Supervised fine-tuning on (prompt, response) demonstrations: cross-entropy on the
    response tokens (and EOS) only. Builds the tiny model first when `model.policy: tiny`.
    Saves a Hugging Face model folder (safetensors) to `out_dir`; returns it."""
    import torch

    from rlhf_ray.llm.modeling import encode_pairs, load_policy, load_tokenizer, save_model

    torch.set_num_threads(cfg.run.torch_threads)
    torch.manual_seed(cfg.seed)
    src = cfg.model.policy
    if src == "tiny":
        from rlhf_ray.llm.tiny import build_model

        src = os.path.join(out_dir, "init")
        t = cfg.model.tiny
        build_model(src, t.hidden_size, t.num_layers, t.num_heads, t.intermediate_size,
                    seed=cfg.seed)
    tok = load_tokenizer(src)
    model = load_policy(src, cfg.model.dtype)
    rows = lm_data.load_sft(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft.lr)
    rng = np.random.default_rng(cfg.seed)
    bs = cfg.sft.batch_size
    t0 = time.time()
    for epoch in range(cfg.sft.epochs):
        perm = rng.permutation(len(rows))
        losses = []
        for s in range(0, len(rows), bs):
            part = [rows[i] for i in perm[s:s + bs]]
            b = encode_pairs(tok, [r["prompt"] for r in part], [r["response"] for r in part],
                             cfg.data.max_prompt_tokens, cfg.generation.max_new_tokens)
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
    (Path(out) / "sft_stats.json").write_text(json.dumps(
        {"loss": float(np.mean(losses)), "examples": len(rows), "seconds": time.time() - t0}))
    return out


# ------------------------------------------------------------------------ the controller


class LLMController:
    """The whole loop. Stages: `sft()`, `initial_reward_model()`, `ppo()`; `run()` does all."""

    def __init__(self, cfg: LLMConfig, run_dir: str | None = None,
                 on_metrics: Callable[[dict], None] | None = None, progress: bool = True):
        self.cfg = cfg
        name = run_name(cfg)
        remote_store = "://" in cfg.run.storage_path
        self.run_dir = Path(run_dir or os.path.join("runs" if remote_store else cfg.run.storage_path, name))
        self.store_root = (f"{cfg.run.storage_path.rstrip('/')}/{name}/preferences" if remote_store
                           else str(self.run_dir / "preferences"))
        self.on_metrics, self.progress = on_metrics, progress
        self.run_id = uuid.uuid4().hex[:8]
        self.rng = np.random.default_rng(cfg.seed)
        self.kl_ctl = _kl_controller(cfg)
        self.iteration = 0
        self.labels_requested = 0
        self.rm_stats: dict = {}
        self.train_ref = None
        self.score_mean, self.score_std = 0.0, 1.0
        self.prompts = lm_data.load_prompts(cfg)
        self.eval_prompts = lm_data.load_prompts(cfg, split="eval")[:64]
        self.cursor = 0
        self.actors: list = []
        self.app_name = None
        self.labeling = None
        self.pg = None  # placement.group_strategy's group (see _group)
        self._synced = None  # (version, weights ref) last pushed to the generation workers
        self.generation_restarts = 0
        self.labeler_incarnation = None
        self.labeler_restarts = 0

    # ---------------------------------------------------------------- roles
    def _group(self) -> None:
        """`placement.group_strategy`: one placement group for the generation workers, the
        learner ranks and the reward trainer (STRICT_PACK: one node, e.g. one GPU box), each
        actor pinned to its own bundle. A Tune trial brings its own group instead."""
        import ray
        from ray.util.placement_group import placement_group

        strategy = self.cfg.placement.group_strategy
        if strategy is None or getattr(self, "bundles", None):
            return
        bundles = run_bundles(self.cfg)
        bundles[0] = {"CPU": 0.01}  # the controller's bundle: it runs in the driver
        self.pg = placement_group(bundles, strategy=strategy, name=f"rlhf-llm-{self.run_id}")
        ready, _ = ray.wait([self.pg.ready()], timeout=self.cfg.placement.group_timeout_s)
        if not ready:
            from ray.util import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None
            raise RuntimeError(
                f"placement.group_strategy={strategy}: the bundles {bundles[1:]} could not be "
                f"placed within {self.cfg.placement.group_timeout_s:.0f} s (cluster resources: "
                f"{ray.cluster_resources()}); lower the roles' resources, add nodes or use PACK")
        self.bundles = llm_bundle_map(self.cfg)

    def _bundle(self, role: str, i: int) -> int | None:
        """Where a role's i-th actor goes in a Tune trial's placement group (set by the sweep
        as `bundles = {role: [indices]}`); None outside one."""
        idx = (getattr(self, "bundles", None) or {}).get(role)
        return idx[i] if idx else None

    def _log(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr, flush=True)

    def start_generation(self, policy_path: str) -> None:
        from rlhf_ray.llm.generation import generation_worker_class

        cfg, place = self.cfg, self.cfg.placement
        cls = generation_worker_class(cfg.generation.backend)
        self.gens = [_remote(cls, place.generation_worker, self._bundle("generation", i), pg=self.pg,
                             max_restarts=-1).remote(
            policy_path, cfg.generation.model_dump(), cfg.data.max_prompt_tokens,
            cfg.seed * 101 + i, cfg.run.torch_threads, cfg.model.dtype)
            for i in range(place.num_generation_workers)]
        self.actors += self.gens

    def start_learners(self, policy_path: str, critic_path: str,
                       state_path: str | None = None) -> None:
        import ray

        from rlhf_ray.llm.learner import PPOLearner
        from rlhf_ray.llm.modeling import load_tokenizer

        cfg, place = self.cfg, self.cfg.placement
        pad = load_tokenizer(policy_path).pad_token_id
        n = place.num_learners
        self.learners = [_remote(PPOLearner, place.learner, self._bundle("learner", r), pg=self.pg).remote(
            r, n, policy_path, critic_path, cfg.ppo.model_dump(), cfg.generation.temperature,
            cfg.seed, cfg.run.torch_threads, cfg.model.dtype, None, pad, self.sft_path,
            state_path) for r in range(n)]
        self.actors += self.learners
        addr, port = ray.get(self.learners[0].address.remote())
        ray.get([lr.init_group.remote(addr, port, place.backend) for lr in self.learners])

    def start_reward_roles(self, rm_init_path: str, with_labeler: bool) -> None:
        import ray

        from rlhf_ray.labeler import RESTART as LABELER_RESTART
        from rlhf_ray.labeler import Labeler
        from rlhf_ray.llm.reward import LMRewardTrainer
        from rlhf_ray.weights import WeightStore

        cfg, place = self.cfg, self.cfg.placement
        self.weight_store = _remote(WeightStore, place.labeler,
                                    name=f"rlhf-lm-weights-{self.run_id}").remote()
        self.trainer = _remote(LMRewardTrainer, place.reward_trainer,
                               self._bundle("reward_trainer", 0), pg=self.pg).remote(
            rm_init_path, cfg.reward_model, max_prompt_tokens=cfg.data.max_prompt_tokens,
            max_response_tokens=cfg.generation.max_new_tokens + 1, seed=cfg.seed,
            torch_threads=cfg.run.torch_threads, dtype=cfg.model.dtype)
        self.actors += [self.weight_store, self.trainer]
        self.labeler = None
        if with_labeler:
            lab = cfg.labeler
            self.labeler = _remote(Labeler, place.labeler,
                                   name=f"rlhf-lm-labeler-{self.run_id}",
                                   **LABELER_RESTART).remote(
                self.store_root, lab.source, None, cfg.seed, cfg.labels.budget, lab.lease_s,
                lab.deadline_s, lab.oracle)
            self.actors.append(self.labeler)
            if lab.source != "oracle":
                from rlhf_ray.labeling.service import start_labeling

                self.labeling = start_labeling(
                    cfg, labeler_name=f"rlhf-lm-labeler-{self.run_id}",
                    namespace=ray.get_runtime_context().namespace, store_root=self.store_root,
                    run_id=self.run_id)
                print(f"labeling page: {self.labeling.url}", file=sys.stderr, flush=True)
                (self.run_dir / "labeling_url.txt").write_text(self.labeling.url + "\n")
                os.chmod(self.run_dir / "labeling_url.txt", 0o600)  # it carries the token
        ray.get(self.weight_store.get_version.remote())

    def deploy_reward_model(self, rm_path: str, wait: bool = True) -> None:
        """`wait=False`: the replica starts while the caller starts the learners (each role's
        process start is mostly imports; overlapping them saves seconds per run)."""
        import ray

        from rlhf_ray.llm import serve_lm

        self.app_name = f"rlhf-lm-rm-{self.run_id}"
        self.rm_handle = serve_lm.deploy(
            rm_path, app_name=self.app_name, weight_store=f"rlhf-lm-weights-{self.run_id}",
            namespace=ray.get_runtime_context().namespace, serve_cfg=self.cfg.placement.reward_model,
            torch_threads=self.cfg.run.torch_threads,
            max_prompt_tokens=self.cfg.data.max_prompt_tokens,
            max_response_tokens=self.cfg.generation.max_new_tokens + 1, wait=wait)

    def stop(self) -> None:
        import ray
        from ray import serve

        if self.labeling is not None:
            from rlhf_ray.labeling.service import stop_labeling

            stop_labeling(self.labeling)
            self.labeling = None
        if self.app_name:
            try:
                serve.delete(self.app_name)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
        if getattr(self, "pg", None) is not None:
            from ray.util import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None
            self.bundles = None

    # ---------------------------------------------------------------- sampling
    def next_prompts(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            if self.cursor % len(self.prompts) == 0:
                self.order = self.rng.permutation(len(self.prompts))
            out.append(self.prompts[self.order[self.cursor % len(self.prompts)]])
            self.cursor += 1
        return out

    def _resync(self, worker, patience_s: float = 120.0) -> None:
        """Push the current policy to a restarted generation worker (waiting out its restart)."""
        import ray

        give_up = time.monotonic() + patience_s
        while self._synced is not None:
            try:
                ray.get(worker.update_weights.remote(*self._synced))
                return
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.5)

    def generate(self, prompts: list[str], n: int = 1) -> dict:
        """Split prompts over the generation workers (all in flight at once) and merge."""
        import ray

        k = len(self.gens)
        parts = [prompts[i::k] for i in range(k)]
        done: dict[int, dict] = {}
        for attempt in range(5):
            refs = {i: g.generate.remote(parts[i], n) for i, g in enumerate(self.gens)
                    if parts[i] and i not in done}
            for i, ref in refs.items():
                try:
                    done[i] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    if attempt == 4:
                        raise
                    # the worker died; Ray restarts it with the weights it started from:
                    # give it the current policy before asking again
                    self.generation_restarts += 1
                    self._resync(self.gens[i])
            if all(i in done for i in range(k) if parts[i]):
                break
        outs = [done[i] for i in sorted(done)]
        merged: dict = {"prompt_ids": [], "response_ids": [], "texts": [], "prompts": []}
        for o in outs:
            for key in merged:
                merged[key] += o[key]
        merged["versions"] = [o["version"] for o in outs]
        merged["tokens"] = sum(o["tokens"] for o in outs)
        merged["generate_s"] = max(o["generate_s"] for o in outs)
        return merged

    # ---------------------------------------------------------------- labels
    def ask_for_labels(self, n_prompts: int, block: bool) -> int:
        """K samples for each of n prompts from the current policy -> ranking queries."""
        import ray

        cfg = self.cfg
        n_prompts = min(n_prompts, cfg.labels.budget - self.labels_requested)
        if n_prompts <= 0 or self.labeler is None:
            return 0
        k = cfg.labels.responses_per_query
        prompts = self.next_prompts(n_prompts)
        out = self.generate(prompts, n=k)
        resp = [out["texts"][i * k:(i + 1) * k] for i in range(n_prompts)]
        ref = self.labeler.submit_texts.remote(prompts, resp, int(self.rm_stats.get("rm_version", 0)))
        if block:
            ray.get(ref)
        else:  # waited for before a checkpoint, so every query asked for is in the store
            self._submits = [r for r in getattr(self, "_submits", []) if not _done(r)] + [ref]
        self.labels_requested += n_prompts
        return n_prompts

    def feed_reward_trainer(self, block: bool, steps: int | None = None,
                            epochs: int | None = None) -> None:
        import ray

        if self.labeler is None:
            return
        new = ray.get(self.labeler.drain_texts.remote())
        due = bool(new)  # a training round on new data
        incarnation = ray.get(self.labeler.stats.remote())["incarnation"]
        if self.labeler_incarnation not in (None, incarnation):
            # the labeler restarted and lost what it had not handed over yet: the store has
            # every acknowledged label, so it becomes the trainer's whole data set again
            self.trainer.replace.remote(ray.get(
                self.labeler.stored_text_comparisons.remote(clear_undrained=True)))
            self.labeler_restarts += 1
            due = True
        elif new:
            self.trainer.add.remote(new)
        self.labeler_incarnation = incarnation
        if self.train_ref is not None:
            ready, _ = ray.wait([self.train_ref], timeout=None if block else 0)
            if not ready:
                return
            self.rm_stats = ray.get(self.train_ref) or self.rm_stats
            self.train_ref = None
        if due or block:
            self.train_ref = self.trainer.train_and_publish.remote(self.weight_store, steps, epochs)
            if block:
                self.rm_stats = ray.get(self.train_ref)
                self.train_ref = None

    # ---------------------------------------------------------------- stages
    def sft(self) -> str:
        import ray

        cfg = self.cfg
        if cfg.model.sft_path:
            return cfg.model.sft_path
        out = str((self.run_dir / "sft").resolve())
        task = _remote(_SFTTask, cfg.placement.learner, self._bundle("learner", 0), pg=self.pg).remote()
        self.actors.append(task)
        self._log("stage 1/3: supervised fine-tuning")
        path = ray.get(task.run.remote(cfg, out))
        ray.kill(task)
        return path

    def initial_reward_model(self, sft_path: str) -> str:
        """Rankings of SFT samples -> the first reward model, saved to the run folder."""
        import ray

        stored = ray.get(self.labeler.stored_text_comparisons.remote())
        have = len({c["ranking_id"] for c in stored})
        if stored:  # a reopened store: its labels count, none is asked for twice
            ray.get(self.trainer.add.remote(stored))
            self.labels_requested = have
        want = max(0, self.cfg.labels.initial - have)
        self._log(f"stage 2/3: reward model from {have} stored and {want} new rankings of "
                  "SFT samples")
        self.ask_for_labels(want, block=True)
        if self.cfg.labeler.source != "oracle":
            self._wait_for_humans(self.cfg.labels.initial)
        self.feed_reward_trainer(block=True, epochs=self.cfg.reward_model.initial_epochs)
        out = str((self.run_dir / "reward_model").resolve())
        ray.get(self.trainer.save.remote(out))
        return out

    def _wait_for_humans(self, n: int, timeout_s: float = 24 * 3600) -> None:
        import ray

        t0 = time.time()
        while time.time() - t0 < timeout_s:
            ray.get(self.labeler.expire_overdue.remote())  # mixed: the oracle fills in late ones
            st = ray.get(self.labeler.stats.remote())
            if st["labels_total"] >= n:
                return
            time.sleep(2.0)

    def calibrate(self) -> None:
        """Reward normalization: the reward model's mean and std on SFT samples (InstructGPT
        normalizes so that the SFT model scores 0 on average); fixed for the run."""
        prompts = self.eval_prompts
        out = self.generate(prompts)
        res = retry_call(lambda: self.rm_handle.score.remote(out["prompts"], out["texts"]))
        s = np.asarray(res["scores"], dtype=np.float64)
        if self.cfg.ppo.normalize_reward and len(s) > 1:
            self.score_mean, self.score_std = float(s.mean()), float(max(s.std(), 1e-6))
        oracle = _oracle(self.cfg)
        self.sft_oracle = float(np.mean([oracle(p, r) for p, r in zip(out["prompts"], out["texts"])]))

    def ppo(self, online: bool) -> dict:
        import ray

        cfg = self.cfg
        self._log(f"stage 3/3: PPO for {cfg.run.iterations} iterations")
        oracle = _oracle(cfg)
        writer = MetricsWriter(self.run_dir)
        t_start = time.time()
        last: dict = {}
        try:
            while self.iteration < cfg.run.iterations:
                t0 = time.perf_counter()
                prompts = self.next_prompts(cfg.ppo.rollout_batch_size)
                out = self.generate(prompts)
                t1 = time.perf_counter()
                res = retry_call(lambda: self.rm_handle.score.remote(out["prompts"], out["texts"]))
                raw = np.asarray(res["scores"], dtype=np.float64)
                scores = (raw - self.score_mean) / self.score_std
                if cfg.ppo.reward_clip:
                    scores = np.clip(scores, -cfg.ppo.reward_clip, cfg.ppo.reward_clip)
                t2 = time.perf_counter()
                beta = self.kl_ctl.beta
                n = len(self.learners)
                p_len = max(len(x) for x in out["prompt_ids"])
                r_len = max(len(y) for y in out["response_ids"])
                stats = ray.get([lr.step.remote(
                    {"prompt_ids": out["prompt_ids"][r::n], "response_ids": out["response_ids"][r::n],
                     "scores": scores[r::n], "prompt_len": p_len, "response_len": r_len}, beta)
                    for r, lr in enumerate(self.learners)])[0]
                t3 = time.perf_counter()
                self.kl_ctl.update(stats["kl_mean"], len(prompts))
                version, weights = ray.get(self.learners[0].policy_weights.remote())
                ref = ray.put(weights)
                self._synced = (version, ref)  # what a restarted worker is given
                ray.get([g.update_weights.remote(version, ref) for g in self.gens])
                t4 = time.perf_counter()
                self.iteration += 1
                if online and cfg.labeler.source == "mixed":
                    ray.get(self.labeler.expire_overdue.remote())
                if online and cfg.labels.per_iteration:
                    self.ask_for_labels(cfg.labels.per_iteration, block=False)
                    self.feed_reward_trainer(block=False)
                t5 = time.perf_counter()
                oracle_scores = [oracle(p, r) for p, r in zip(out["prompts"], out["texts"])]
                last = {
                    "iteration": self.iteration,
                    "oracle_score_mean": _f(np.mean(oracle_scores)),
                    "sft_oracle_score_mean": _f(self.sft_oracle),
                    "rm_score_mean": _f(raw.mean()),
                    "kl_mean": _f(stats["kl_mean"]),
                    "kl_coef": _f(beta),
                    "kl_coef_next": _f(self.kl_ctl.beta),
                    "response_len_mean": _f(stats["response_len_mean"]),
                    "tokens_per_s": _f(out["tokens"] / (t5 - t0)),
                    "policy_version": int(version),
                    "sample_policy_versions": sorted(set(out["versions"])),
                    "generation_restarts": self.generation_restarts,
                    "labeler_restarts": self.labeler_restarts,
                    "rm_version": int(res["version"]),
                    **self._label_counts(),
                    "rm_val_accuracy": _f(self.rm_stats.get("rm_val_accuracy")),
                    "pg_loss": _f(stats.get("pg_loss")), "vf_loss": _f(stats.get("vf_loss")),
                    "approx_kl": _f(stats.get("approx_kl")), "clipfrac": _f(stats.get("clipfrac")),
                    "generate_s": round(t1 - t0, 3), "score_s": round(t2 - t1, 3),
                    "learner_s": round(t3 - t2, 3), "sync_s": round(t4 - t3, 3),
                    "labeling_s": round(t5 - t4, 3), "iteration_s": round(t5 - t0, 3),
                    "time_s": round(time.time() - t_start, 3),
                }
                writer.write(last)
                if self.on_metrics:
                    self.on_metrics(last)
                if self.progress:
                    print(progress_line(last), flush=True)
                every = cfg.run.checkpoint_every
                if every and self.iteration % every == 0 and self.iteration < cfg.run.iterations:
                    self.checkpoint()
            if self.train_ref is not None:
                self.rm_stats = ray.get(self.train_ref)
                self.train_ref = None
            self.checkpoint(final=True)
            return last
        finally:
            writer.close()

    def _label_counts(self) -> dict:
        """Rankings answered, in all and by source (the oracle, each human labeler)."""
        import ray

        if self.labeler is None:
            return {"labels_total": 0, "labels_human": 0, "labels_oracle": 0}
        st = ray.get(self.labeler.stats.remote())
        by = st["labels_by_source"]
        return {"labels_total": int(st["labels_total"]), "labels_pending": st["labels_pending"],
                "labels_by_source": dict(by), "labels_oracle": by.get("oracle", 0),
                "labels_human": sum(v for k, v in by.items() if k.startswith("human:"))}

    def checkpoint(self, final: bool = False) -> Path:
        import ray

        if getattr(self, "_submits", None):  # queries in flight reach the store first
            ray.get(self._submits)
            self._submits = []

        path = self.run_dir / ("final" if final else f"checkpoints/iter_{self.iteration:06d}")
        path.mkdir(parents=True, exist_ok=True)
        tok_path = self.sft_path
        ray.get(self.learners[0].save.remote(str(path.resolve()), tok_path))
        if self.trainer is not None:
            ray.get(self.trainer.save.remote(str((path / "reward_model").resolve())))
        state = {"format": CHECKPOINT_FORMAT, "workload": "llm", "iteration": self.iteration,
                 "kl_controller": self.kl_ctl.state_dict(), "prompt_cursor": self.cursor,
                 "prompt_order": [int(i) for i in getattr(self, "order", [])],
                 "labels_requested": self.labels_requested, "score_mean": self.score_mean,
                 "score_std": self.score_std, "sft_oracle": self.sft_oracle,
                 "rm_stats": self.rm_stats, "sft_path": str(self.sft_path),
                 "kl_settings": self.cfg.ppo.kl.model_dump(mode="json"),
                 "rng": self.rng.bit_generator.state}
        (path / "controller.json").write_text(json.dumps(state, default=float))
        return path

    # ---------------------------------------------------------------- resuming
    def load_state(self, ckpt: Path) -> dict:
        """The controller's part of a checkpoint (models are loaded by the roles)."""
        try:
            state = json.loads((Path(ckpt) / "controller.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"checkpoint {ckpt}: unreadable controller.json ({exc})") from None
        if state.get("format") != CHECKPOINT_FORMAT or state.get("workload") != "llm":
            raise ValueError(f"checkpoint {ckpt}: format {state.get('format')!r} of workload "
                             f"{state.get('workload')!r}; this version reads format "
                             f"{CHECKPOINT_FORMAT} of the llm workload")
        from rlhf_ray.core.lm_ppo import kl_controller_from_state

        self.iteration = int(state["iteration"])
        self.kl_ctl = kl_controller_from_state(state["kl_controller"])
        self.cursor = int(state["prompt_cursor"])
        if state.get("prompt_order"):
            self.order = np.asarray(state["prompt_order"])
        self.labels_requested = int(state["labels_requested"])
        self.score_mean, self.score_std = float(state["score_mean"]), float(state["score_std"])
        self.sft_oracle = float(state["sft_oracle"])
        self.rm_stats = dict(state.get("rm_stats") or {})
        self.rng.bit_generator.state = state["rng"]
        return state

    def resume(self, ckpt: Path, override_kl: bool = False) -> dict:
        """Continue a run from a checkpoint folder: policy, critic and optimizer moments,
        reward model, KL controller, prompt order and position, label count, RNG state.
        `override_kl`: take beta and the target from this run's config (a PBT trial that
        was handed a donor's checkpoint with mutated KL settings)."""
        import ray

        cfg = self.cfg
        ckpt = Path(ckpt).resolve()
        state = self.load_state(ckpt)
        if override_kl or state.get("kl_settings", cfg.ppo.kl.model_dump(mode="json")) != \
                cfg.ppo.kl.model_dump(mode="json"):
            # the KL settings changed since the checkpoint (a PBT mutation, an override on
            # resume): start the controller from the new settings
            self.kl_ctl = _kl_controller(cfg)
        self.sft_path = state["sft_path"]
        policy, critic, rm = str(ckpt / "policy"), str(ckpt / "critic"), str(ckpt / "reward_model")
        self._log(f"resuming from {ckpt} at iteration {self.iteration}")
        self.start_generation(policy)
        self.start_reward_roles(rm, with_labeler=True)
        stored = ray.get(self.labeler.stored_text_comparisons.remote())
        if stored:  # the reward model's data set, as it was (labels are never lost)
            ray.get(self.trainer.add.remote(stored))
        ray.get(self.trainer.set_version.remote(int(self.rm_stats.get("rm_version", 0))))
        self.deploy_reward_model(rm, wait=False)
        self.start_learners(policy, critic, str(ckpt / "optimizer.pt"))
        version = ray.get(self.learners[0].get_version.remote())
        ray.get([g.set_version.remote(version) for g in self.gens])
        self._wait_reward_model()
        return state

    def _wait_reward_model(self) -> None:
        from rlhf_ray.roles import wait_running

        wait_running(self.app_name)

    # ---------------------------------------------------------------- the whole loop
    def run(self, stages: str = "all", resume_from: str | None = None,
            override_kl: bool = False) -> dict:
        """stages: `all` (SFT -> RM -> online PPO), `rm` (SFT model -> RM), `ppo` (SFT model +
        RM -> PPO against a fixed reward model). `resume_from`: a checkpoint folder to continue
        the online loop from."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        started = init_ray(cfg)
        self.trainer = None
        try:
            self._group()
            if resume_from is not None:
                self.resume(Path(resume_from), override_kl)
                return self.ppo(online=True)
            self.sft_path = self.sft()
            if stages == "sft":
                return {"sft_path": self.sft_path}
            self.start_generation(self.sft_path)
            if cfg.model.reward_path and stages != "rm":
                rm_path = cfg.model.reward_path
                self.start_reward_roles(rm_path, with_labeler=stages == "all")
                if self.labeler is not None:  # labels already in the store stay in the data set
                    import ray

                    stored = ray.get(self.labeler.stored_text_comparisons.remote())
                    if stored:
                        ray.get(self.trainer.add.remote(stored))
                        self.labels_requested = len({c["ranking_id"] for c in stored})
            else:
                self.start_reward_roles(self.sft_path, with_labeler=True)
                if cfg.data.preferences_path:
                    self._log("stage 2/3: reward model from data.preferences_path")
                    from rlhf_ray.llm.reward import rankings_to_comparisons

                    import ray

                    ray.get(self.trainer.add.remote(rankings_to_comparisons(
                        lm_data.load_preferences(cfg.data.preferences_path))))
                    self.rm_stats = ray.get(self.trainer.train.remote(
                        epochs=cfg.reward_model.initial_epochs))
                    rm_path = str((self.run_dir / "reward_model").resolve())
                    ray.get(self.trainer.save.remote(rm_path))
                else:
                    rm_path = self.initial_reward_model(self.sft_path)
                self._log(f"reward model: val accuracy {self.rm_stats.get('rm_val_accuracy')}")
                if stages == "rm":
                    return {"reward_path": rm_path, **self.rm_stats}
            critic = rm_path if cfg.model.critic_init == "reward_model" else self.sft_path
            self.deploy_reward_model(rm_path, wait=False)
            self.start_learners(self.sft_path, critic)
            self._wait_reward_model()
            self.calibrate()
            return self.ppo(online=stages == "all")
        finally:
            self.stop()
            if started:
                import ray

                ray.shutdown()


class _SFTTask:
    """SFT as an actor so it lands where the learner's resources are (a GPU node)."""

    def run(self, cfg: LLMConfig, out: str) -> str:
        return run_sft(cfg, out, progress=True)


def progress_line(m: dict) -> str:
    def fmt(key, spec):
        v = m.get(key)
        return "-" if v is None else format(v, spec)

    return (f"iter {m['iteration']:4d} | oracle {fmt('oracle_score_mean', '6.3f')} "
            f"(sft {fmt('sft_oracle_score_mean', '.3f')}) | rm {fmt('rm_score_mean', '7.3f')} | "
            f"kl {fmt('kl_mean', '6.3f')} | beta {fmt('kl_coef', '.4f')} | "
            f"len {fmt('response_len_mean', '4.1f')} | tok/s {fmt('tokens_per_s', '6.0f')} | "
            f"labels {m.get('labels_total', 0)} | v{m['policy_version']} | {m['time_s']:.0f}s")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run folder: `final/` if the run finished, else the highest
    `checkpoints/iter_*` that holds a complete controller.json."""
    run = Path(run_dir)
    cands = sorted((run / "checkpoints").glob("iter_*")) if (run / "checkpoints").exists() else []
    if (run / "final").exists():
        cands.append(run / "final")
    for c in reversed(cands):
        if (c / "controller.json").exists():
            return c
    return None


def train(cfg: LLMConfig, run_dir: str | None = None, stages: str = "all",
          on_metrics: Callable[[dict], None] | None = None, progress: bool = True,
          resume: bool = False) -> Path:
    """Run the LLM workload; returns the run folder. `resume`: continue `run_dir` from its
    latest checkpoint up to `run.iterations`."""
    ctl = LLMController(cfg, run_dir, on_metrics, progress)
    if progress:
        print(f"run folder: {ctl.run_dir}", file=sys.stderr, flush=True)
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(ctl.run_dir)
        if ckpt is None:
            raise ValueError(f"--resume {ctl.run_dir}: no checkpoint to resume from")
    ctl.run(stages, resume_from=str(ckpt) if ckpt else None)
    return ctl.run_dir
