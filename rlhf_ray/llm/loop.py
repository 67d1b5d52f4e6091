"""The controller of the LLM workload: InstructGPT's three steps on Ray, online.

  1. supervised fine-tuning (SFT) on demonstrations;
  2. a reward model from rankings of SFT samples (people, an oracle, or a file);
  3. PPO against the reward model with a KL penalty against the SFT model (beta fixed, or
     adapted to a KL target as Ziegler et al. 2019 do), while preference collection goes on
     for the policy's samples and the reward model is refitted as rankings arrive (iterative
     online RLHF).

One PPO iteration: prompts -> generate (policy version v) -> score (Serve, batched) ->
learner step on every rank's shard -> KL controller -> policy v + 1 to the generation
workers -> rankings asked for on fresh samples -> reward trainer fed (asynchronously) ->
metrics -> checkpoint. The stages also run alone (`rlhf-ray sft | rm | ppo`).

The run folder, Ray, metrics rows, resuming and the labeler are the shared layer's
(`rlhf_ray.controller`, `rlhf_ray.feedback`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from rlhf_ray.controller import RunController
from rlhf_ray.core.lm_ppo import AdaptiveKLController, FixedKLController
from rlhf_ray.feedback import Feedback, on_new_labels
from rlhf_ray.llm import data as lm_data
from rlhf_ray.llm.workers import GenerationGroup, LearnerGroup
from rlhf_ray.metrics import clean
from rlhf_ray.roles import remote_role, retry_call


def kl_controller(cfg):
    k = cfg.ppo.kl
    if k.controller == "adaptive":
        return AdaptiveKLController(k.init_coef, k.target, k.horizon)
    return FixedKLController(k.init_coef)


def text_oracle(cfg):
    from rlhf_ray.labeler import load_text_oracle

    return load_text_oracle(cfg.labeler.oracle)


class LLMController(RunController):
    """The whole loop. Stages: `sft()`, `fit_reward_model()`, `ppo()`; `run()` does all."""

    def __init__(self, cfg, run_dir=None, on_metrics=None, progress: bool = True,
                 stop_event=None, **kwargs):
        super().__init__(cfg, run_dir, on_metrics, progress, stop_event, **kwargs)
        self.kl_ctl = kl_controller(cfg)
        self.score_mean, self.score_std = 0.0, 1.0
        self.sft_oracle = None
        self.prompts = lm_data.load_prompts(cfg)
        self.eval_prompts = lm_data.load_prompts(cfg, split="eval")[:64]
        self.cursor, self.order = 0, np.arange(0)
        self.sft_path = None
        self.generation: GenerationGroup | None = None
        self.learner: LearnerGroup | None = None
        self.trainer = None
        self.feedback = Feedback(cfg, self.folder, self.names, kind="text",
                                 round_rule=on_new_labels)

    @staticmethod
    def budget(cfg) -> tuple[str, str, int]:
        return "iteration", "run.iterations", cfg.run.iterations

    @property
    def labeler(self):
        return self.feedback.labeler

    # ---------------------------------------------------------------- the whole loop
    def run(self, stages: str = "all", resume_from: str | Path | None = None,
            override_kl: bool = False) -> dict:
        """stages: `all` (SFT -> RM -> online PPO), `sft`, `rm` (SFT model -> RM), `ppo` (SFT
        model + RM -> PPO against a fixed reward model). `resume_from`: a checkpoint folder
        to continue the online loop from; `override_kl`: take beta and the KL target from
        this config (a PBT trial handed a donor's checkpoint with mutated settings)."""
        import ray

        cfg = self.cfg
        ckpt = Path(resume_from).resolve() if resume_from is not None else None
        with self.session():
            self.start_group()
            state = self.restore(ckpt, override_kl) if ckpt else None
            # 1. supervised fine-tuning
            self.sft_path = state["sft_path"] if state else self.sft()
            if stages == "sft":
                return {"sft_path": self.sft_path}
            policy = str(ckpt / "policy") if state else self.sft_path
            self.start_generation(policy)
            # 2. the reward model: from rankings of SFT samples or a file, or a given one
            fixed = bool(cfg.model.reward_path) and stages != "rm" and state is None
            rm_path = (str(ckpt / "reward_model") if state else
                       cfg.model.reward_path if fixed else self.sft_path)
            self.start_reward_roles(rm_path, with_labeler=not fixed or stages == "all")
            if state:  # the labels, the counts and the version go on
                self.feedback.load_stored()
                self.feedback.restore(state)
                ray.get(self.trainer.set_version.remote(
                    int(self.feedback.rm_stats.get("rm_version", 0))))
            elif fixed:  # labels already in the store stay in the data set
                if self.labeler is not None:
                    self.feedback.requested = self.feedback.load_stored()
            else:
                rm_path = self.fit_reward_model()
                if stages == "rm":
                    return {"reward_path": rm_path, **self.feedback.rm_stats}
            # 3. PPO with the KL penalty; the reward model's replica starts with the learners
            critic = (str(ckpt / "critic") if state else
                      rm_path if cfg.model.critic_init == "reward_model" else self.sft_path)
            self.deploy_reward_model(rm_path)
            self.start_learners(policy, critic, str(ckpt / "optimizer.pt") if state else None)
            if state:  # the workers hold the checkpoint's policy version
                self.generation.set_version(self.learner.version())
            from rlhf_ray.roles import wait_running

            wait_running(self.names.reward_app)
            if state is None:
                self.calibrate()
            return self.ppo(online=stages == "all")

    # ---------------------------------------------------------------- stages
    def sft(self) -> str:
        import ray

        from rlhf_ray.llm.sft import SFTTask

        cfg = self.cfg
        if cfg.model.sft_path:
            return cfg.model.sft_path
        out = str((self.run_dir / "sft").resolve())
        task = remote_role(SFTTask, cfg.placement.learner, self.bundle("learner"),
                           pg=self.pg).remote()
        self.actors.append(task)
        self.log("stage 1/3: supervised fine-tuning")
        path = ray.get(task.run.remote(cfg, out))
        ray.kill(task)
        return path

    def fit_reward_model(self) -> str:
        """The first reward model, saved to the run folder: from `data.preferences_path`, or
        from rankings of SFT samples (stored ones count; people label the rest first)."""
        import ray

        cfg = self.cfg
        if cfg.data.preferences_path:
            from rlhf_ray.llm.reward import rankings_to_comparisons

            self.log("stage 2/3: reward model from data.preferences_path")
            ray.get(self.trainer.add.remote(rankings_to_comparisons(
                lm_data.load_preferences(cfg.data.preferences_path))))
            self.feedback.rm_stats = ray.get(self.trainer.train.remote(
                epochs=cfg.reward_model.initial_epochs))
        else:
            have = self.feedback.requested = self.feedback.load_stored()
            want = max(0, cfg.labels.initial - have)
            self.log(f"stage 2/3: reward model from {have} stored and {want} new rankings of "
                     "SFT samples")
            self.ask_for_labels(want, block=True)
            if cfg.labeler.source != "oracle":
                self.feedback.wait_for_labels(cfg.labels.initial)
            self.feedback.feed(block=True, epochs=cfg.reward_model.initial_epochs)
        out = str((self.run_dir / "reward_model").resolve())
        ray.get(self.trainer.save.remote(out))
        acc = self.feedback.rm_stats.get("rm_val_accuracy")
        self.log(f"reward model: val accuracy {'-' if acc is None else format(acc, '.3f')}")
        return out

    def calibrate(self) -> None:
        """Reward normalization: the reward model's mean and std on SFT samples (InstructGPT
        normalizes so that the SFT model scores 0 on average); fixed for the run."""
        out = self.generation.generate(self.eval_prompts)
        res = retry_call(lambda: self.rm_handle.score.remote(out["prompts"], out["texts"]))
        s = np.asarray(res["scores"], dtype=np.float64)
        if self.cfg.ppo.normalize_reward and len(s) > 1:
            self.score_mean, self.score_std = float(s.mean()), float(max(s.std(), 1e-6))
        oracle = text_oracle(self.cfg)
        self.sft_oracle = float(np.mean([oracle(p, r) for p, r in zip(out["prompts"], out["texts"])]))

    def ppo(self, online: bool) -> dict:
        cfg = self.cfg
        self.log(f"stage 3/3: PPO for {cfg.run.iterations} iterations")
        oracle = text_oracle(cfg)  # the yardstick: never trained on
        self.t_start = time.time()  # time_s counts PPO's time
        last: dict = {}
        while self.iteration < cfg.run.iterations and not self.should_stop():
            t = [time.perf_counter()]
            out = self.generation.generate(self.next_prompts(cfg.ppo.rollout_batch_size))  # v
            t.append(time.perf_counter())
            res = retry_call(lambda: self.rm_handle.score.remote(out["prompts"], out["texts"]))
            raw = np.asarray(res["scores"], dtype=np.float64)
            scores = (raw - self.score_mean) / self.score_std
            if cfg.ppo.reward_clip:
                scores = np.clip(scores, -cfg.ppo.reward_clip, cfg.ppo.reward_clip)
            t.append(time.perf_counter())
            beta = self.kl_ctl.beta
            stats = self.learner.step(out, scores, beta)  # PPO, KL-penalized token rewards
            t.append(time.perf_counter())
            self.kl_ctl.update(stats["kl_mean"], len(out["prompts"]))
            version, weights = self.learner.policy_weights()
            self.generation.push(version, weights)  # version v + 1 to every worker
            t.append(time.perf_counter())
            self.iteration += 1
            if online:
                self.feedback.expire_overdue()
                if cfg.labels.per_iteration:
                    self.ask_for_labels(cfg.labels.per_iteration, block=False)
                    self.feedback.feed()  # a refit on new rankings, asynchronously
            t.append(time.perf_counter())
            oracle_scores = [oracle(p, r) for p, r in zip(out["prompts"], out["texts"])]
            last = self.emit(self.metrics(out, res, raw, oracle_scores, stats, beta, version, t))
            every = cfg.run.checkpoint_every
            if every and self.iteration % every == 0 and self.iteration < cfg.run.iterations:
                self.checkpoint()
        self.feedback.finish_round()
        self.checkpoint(final=self.iteration >= cfg.run.iterations)
        return last

    def metrics(self, out, res, raw, oracle_scores, stats, beta, version, t) -> dict:
        return {
            "iteration": self.iteration,
            "oracle_score_mean": clean(np.mean(oracle_scores)),
            "sft_oracle_score_mean": clean(self.sft_oracle),
            "rm_score_mean": clean(raw.mean()),
            "kl_mean": clean(stats["kl_mean"]), "kl_coef": clean(beta),
            "kl_coef_next": clean(self.kl_ctl.beta),
            "response_len_mean": clean(stats["response_len_mean"]),
            "tokens_per_s": clean(out["tokens"] / (t[5] - t[0])),
            "policy_version": int(version), "sample_policy_versions": sorted(set(out["versions"])),
            "generation_restarts": self.generation.restarts,
            "labeler_restarts": self.feedback.restarts, "rm_version": int(res["version"]),
            **self.feedback.metrics(),
            "pg_loss": clean(stats.get("pg_loss")), "vf_loss": clean(stats.get("vf_loss")),
            "approx_kl": clean(stats.get("approx_kl")), "clipfrac": clean(stats.get("clipfrac")),
            "generate_s": round(t[1] - t[0], 3), "score_s": round(t[2] - t[1], 3),
            "learner_s": round(t[3] - t[2], 3), "sync_s": round(t[4] - t[3], 3),
            "labeling_s": round(t[5] - t[4], 3), "iteration_s": round(t[5] - t[0], 3),
            "time_s": self.elapsed_s(),
        }

    # ---------------------------------------------------------------- roles
    def start_reward_roles(self, rm_init_path: str, with_labeler: bool) -> None:
        """The weight store, the LM reward trainer (from `rm_init_path`) and, for runs that
        collect preferences, the labeler and its page."""
        import ray

        from rlhf_ray.llm.reward import LMRewardTrainer
        from rlhf_ray.weights import WeightStore

        cfg, place = self.cfg, self.cfg.placement
        weights = remote_role(WeightStore, place.labeler, name=self.names.weights).remote()
        self.trainer = remote_role(LMRewardTrainer, place.reward_trainer,
                                   self.bundle("reward_trainer"), pg=self.pg).remote(
            rm_init_path, cfg.reward_model, max_prompt_tokens=cfg.data.max_prompt_tokens,
            max_response_tokens=cfg.generation.max_new_tokens + 1, seed=cfg.seed,
            torch_threads=cfg.run.torch_threads, dtype=cfg.model.dtype)
        self.actors += [weights, self.trainer]
        self.feedback.attach(self.trainer, weights)
        if with_labeler:
            self.feedback.start()
        ray.get(weights.get_version.remote())

    def deploy_reward_model(self, rm_path: str) -> None:
        """Without waiting: the replica starts while the learners load (each role's process
        start is mostly imports); `run` waits for it before PPO starts."""
        import ray

        from rlhf_ray.llm import serve_lm

        self.rm_handle = serve_lm.deploy(
            rm_path, app_name=self.names.reward_app, weight_store=self.names.weights,
            namespace=ray.get_runtime_context().namespace, serve_cfg=self.cfg.placement.reward_model,
            torch_threads=self.cfg.run.torch_threads,
            max_prompt_tokens=self.cfg.data.max_prompt_tokens,
            max_response_tokens=self.cfg.generation.max_new_tokens + 1, wait=False)
        self.apps.append(self.names.reward_app)

    def start_generation(self, policy_path: str) -> None:
        self.generation = GenerationGroup(self.cfg, policy_path, self.bundle, self.pg)
        self.actors += self.generation.workers

    def start_learners(self, policy_path: str, critic_path: str,
                       state_path: str | None = None) -> None:
        """N ranks of one torch.distributed group; the reference is the SFT model."""
        self.learner = LearnerGroup(self.cfg, policy_path, critic_path, self.sft_path,
                                    self.bundle, self.pg, state_path)
        self.actors += self.learner.ranks

    @property
    def gens(self) -> list:
        return self.generation.workers

    # ---------------------------------------------------------------- sampling
    def next_prompts(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            if self.cursor % len(self.prompts) == 0:
                self.order = self.rng.permutation(len(self.prompts))
            out.append(self.prompts[self.order[self.cursor % len(self.prompts)]])
            self.cursor += 1
        return out

    def ask_for_labels(self, n_prompts: int, block: bool) -> int:
        """K samples for each of n prompts from the current policy -> ranking queries."""
        cfg = self.cfg
        n_prompts = min(n_prompts, cfg.labels.budget - self.feedback.requested)
        if n_prompts <= 0 or self.labeler is None:
            return 0
        k = cfg.labels.responses_per_query
        prompts = self.next_prompts(n_prompts)
        out = self.generation.generate(prompts, n=k)
        responses = [out["texts"][i * k:(i + 1) * k] for i in range(n_prompts)]
        self.feedback.ask(n_prompts, prompts, responses, block=block)
        return n_prompts

    # ---------------------------------------------------------------- checkpoints
    def checkpoint(self, final: bool = False) -> Path:
        """Policy, critic and their optimizer moments (rank 0), the reward model, the KL
        controller, the prompt order and position; queries in flight reach the store first."""
        import ray

        self.feedback.settle()
        path = self.folder.checkpoint_dir(self.iteration, final)
        self.learner.save(str(path.resolve()), self.sft_path)
        ray.get(self.trainer.save.remote(str((path / "reward_model").resolve())))
        return self.save_state(path, {
            "kl_controller": self.kl_ctl.state_dict(), "prompt_cursor": self.cursor,
            "prompt_order": [int(i) for i in self.order], "score_mean": self.score_mean,
            "score_std": self.score_std, "sft_oracle": self.sft_oracle,
            "sft_path": str(self.sft_path), "kl_settings": self.cfg.ppo.kl.model_dump(mode="json")})

    def restore(self, ckpt: Path, override_kl: bool = False) -> dict:
        """The controller's part of a checkpoint; the roles load the rest as they start."""
        from rlhf_ray.core.lm_ppo import kl_controller_from_state

        state = self.load_state(ckpt)
        kl_now = self.cfg.ppo.kl.model_dump(mode="json")
        self.kl_ctl = kl_controller_from_state(state["kl_controller"])
        if override_kl or state.get("kl_settings", kl_now) != kl_now:
            # the KL settings changed since the checkpoint (a PBT mutation, an override on
            # resume): the controller starts from the new settings
            self.kl_ctl = kl_controller(self.cfg)
        self.cursor = int(state["prompt_cursor"])
        if state.get("prompt_order"):
            self.order = np.asarray(state["prompt_order"])
        self.score_mean, self.score_std = float(state["score_mean"]), float(state["score_std"])
        self.sft_oracle = float(state["sft_oracle"])
        self.log(f"resuming from {ckpt} at iteration {self.iteration}")
        return state
