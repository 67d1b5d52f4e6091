"""The controller of the LLM workload: InstructGPT's three steps on Ray, online.

  1. supervised fine-tuning (SFT) on demonstrations;
  2. a reward model from rankings of SFT samples (people, an oracle, or a file);
  3. PPO against the reward model with a KL penalty against the SFT model (beta fixed, or
     adapted to a KL target as Ziegler et al. 2019 do), while preference collection goes on
     for the policy's samples and the reward model is refitted as rankings arrive (iterative
     online RLHF).

`run()` is those three steps; where each starts from (fresh, resumed, given files, LoRA) is
decided once (`stages.start_points`). One PPO iteration (`ppo`): prompts -> generate (policy
version v) -> score (Serve, batched) -> learner step on every rank's shard (experience, then
PPO epochs: `experience.py`, `learner.py`) -> KL controller -> policy v + 1 to the generation
workers -> rankings asked for on fresh samples -> reward trainer fed (asynchronously) ->
metrics -> checkpoint. The stages also run alone (`rlhf-ray sft | rm | ppo`).

The run folder, Ray, metrics rows, resuming and the labeler are the shared layer's
(`rlhf_ray.runtime.controller`, `rlhf_ray.feedback`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from rlhf_ray.core.advantages import shape_scores
from rlhf_ray.core.lm_ppo import kl_controller_from_state, make_kl_controller
from rlhf_ray.feedback.loop import Feedback, on_new_labels
from rlhf_ray.llm import data as lm_data
from rlhf_ray.llm import serve as serve_lm
from rlhf_ray.llm.dpo import dpo_stage
from rlhf_ray.llm.evaluation import HeldOut
from rlhf_ray.llm.labeling import query_kind
from rlhf_ray.llm.metrics import LLM, iteration_row, write_resources
from rlhf_ray.llm.normalization import ScoreNormalizer
from rlhf_ray.llm.reward_trainer import LMRewardTrainer, rankings_to_comparisons
from rlhf_ray.llm.sft import SFTTask
from rlhf_ray.llm.stages import StartPoints, start_points
from rlhf_ray.llm.workers import GenerationGroup, LearnerGroup
from rlhf_ray.runtime.actors import remote_role
from rlhf_ray.runtime.controller import RunController
from rlhf_ray.runtime.memory import MemorySampler, peak_memory
from rlhf_ray.runtime.metrics import PhaseTimer
from rlhf_ray.runtime.serving import wait_running
from rlhf_ray.storage import locations
from rlhf_ray.storage.weights import WeightStore

# the reward trainer's statistics every row reports
RM_KEYS = ("rm_val_accuracy", "rm_train_loss", "rm_train_s")


def kl_controller(k):
    """beta's controller from the `ppo.kl` section."""
    return make_kl_controller(k.controller, k.init_coef, k.target, k.horizon, k.min_coef)


def rm_max_response_tokens(cfg) -> int:
    """What the reward model reads as one response: a policy's continuation, or a whole text
    of a preference file (the reviews task's comparisons are whole snippets)."""
    return cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens + 1


@dataclass
class Step:
    """One PPO iteration's results, for its metrics row: the samples, the reward model's
    answer and raw scores, the yardstick's scores, the learner's statistics, the beta it
    stepped with, the policy version it made, and the phases' times."""

    out: dict
    scored: dict
    raw: np.ndarray
    judged: np.ndarray | None  # the yardstick's scores of the samples (None: no yardstick)
    stats: dict
    beta: float
    version: int
    timer: PhaseTimer


class LLMController(RunController):
    """The whole loop. Stages: `sft()`, `fit_reward_model()`, `ppo()`; `run()` does all."""

    metrics_table = LLM

    def __init__(self, cfg, run_dir=None, on_metrics=None, progress: bool = True,
                 stop_event=None, **kwargs):
        super().__init__(cfg, run_dir, on_metrics, progress, stop_event, **kwargs)
        lm_data.check(cfg)
        self.kl_ctl = kl_controller(cfg.ppo.kl)
        self.norm = ScoreNormalizer(cfg.ppo.normalize_reward, cfg.ppo.reward_clip)
        self.queries_from_rollout = 0  # this iteration's ranking queries that were its groups
        self.sft_oracle = None
        self.stage_memory: dict[str, float] = {}  # peak MiB of roles gone before the end
        self.memory_sampler = MemorySampler()  # the machine's used memory over the run
        self.prompts = lm_data.load_prompts(cfg)
        self.held_out = HeldOut(cfg, self.run_dir)
        self.cursor, self.order = 0, np.arange(0)
        self.sft_path = None
        self.generation: GenerationGroup | None = None
        self.learner: LearnerGroup | None = None
        self.trainer = None
        self.feedback = Feedback(cfg, self.folder, self.names, kind=query_kind(cfg),
                                 rm_keys=RM_KEYS, round_rule=on_new_labels)

    @staticmethod
    def budget(cfg) -> tuple[str, str, int]:
        return "iteration", "run.iterations", cfg.run.iterations

    @property
    def labeler(self):
        return self.feedback.labeler

    # ---------------------------------------------------------------- the whole loop
    def run(self, stages: str = "all", resume_from: str | Path | None = None,
            override_kl: bool = False) -> dict:
        """stages: `all` (SFT -> RM -> online PPO, or with `mode: dpo` SFT -> DPO), `sft`,
        `rm` (SFT model -> RM), `ppo` (SFT model + RM -> PPO against a fixed reward model),
        `dpo` (SFT model -> DPO). `resume_from`: a checkpoint folder
        to continue the online loop from; `override_kl`: take beta and the KL target from
        this config (a PBT trial handed a donor's checkpoint with mutated settings)."""
        cfg = self.cfg
        ckpt = locations.normalize(resume_from) if resume_from is not None else None
        with self.session():
            self.memory_sampler.start()
            self.start_group(cfg.placement.roles(), cfg.placement.group_strategy,
                             cfg.placement.group_timeout_s)
            state = self.restore(ckpt, override_kl) if ckpt else None
            # 1. supervised fine-tuning (or the SFT model a checkpoint or the config names)
            self.sft_path = state["sft_path"] if state else self.sft()
            if stages == "sft":
                return {"sft_path": self.sft_path}
            if stages == "dpo" or (stages == "all" and cfg.mode == "dpo"):
                return self.dpo()
            start = start_points(cfg, stages, self.sft_path, self.folder.loc("reward_model"),
                                 ckpt)
            self.start_generation(start.policy, start.adapter)
            # 2. the reward model: fitted to rankings of SFT samples (or a file), or given, or
            #    the checkpoint's, with the labels the store holds
            self.reward_model(start, state)
            if stages == "rm":
                return {"reward_path": start.reward_model, **self.feedback.rm_stats}
            # 3. PPO against it with the KL penalty (its replica starts with the learners)
            self.deploy_reward_model(start.reward_model)
            self.start_learners(start)
            if state:  # the workers hold the checkpoint's policy version
                self.generation.set_version(self.learner.version())
            wait_running(self.names.reward_app)
            if state is None:
                self.calibrate()
            return self.ppo(online=stages == "all")

    # ---------------------------------------------------------------- stages
    def sft(self) -> str:
        cfg = self.cfg
        if cfg.model.sft_path:
            return cfg.model.sft_path
        out = self.folder.loc("sft")
        task = remote_role(SFTTask, cfg.placement.learner, self.bundle("learner"),
                           pg=self.pg).remote()
        self.actors.append(task)
        self.log("stage 1/3: supervised fine-tuning")
        path = ray.get(task.run.remote(cfg, out))
        self.stage_memory.update({f"sft_{k}": v for k, v in peak_memory({"task": task}).items()})
        ray.kill(task)
        return path

    def dpo(self) -> dict:
        """DPO of the SFT model, then judged against it (`llm/dpo.py`'s `dpo_stage`)."""
        return dpo_stage(self)

    def reward_model(self, start: StartPoints, state: dict | None) -> None:
        """Stage 2: the reward trainer (and the labeler where rankings are collected), then
        the first reward model fitted, or the checkpoint's labels, counts and version taken
        up, or (a given reward model) the stored labels kept in its data set."""
        self.start_reward_roles(start.reward_init, with_labeler=start.collect_labels)
        if state:
            self.feedback.load_stored()
            self.feedback.restore(state)
            ray.get(self.trainer.set_version.remote(
                int(self.feedback.rm_stats.get("rm_version", 0))))
        elif start.fit_reward_model:
            self.fit_reward_model()
        elif self.labeler is not None:
            self.feedback.requested = self.feedback.load_stored()

    def fit_reward_model(self) -> str:
        """The first reward model, saved to the run folder: from `data.preferences_path`, or
        from rankings of SFT samples (stored ones count; people label the rest first)."""
        cfg = self.cfg
        given = lm_data.initial_preferences(cfg)
        if given is not None:
            rankings, stats = given
            where = "data.preferences_path" if cfg.data.preferences_path else "human ratings"
            self.log(f"stage 2/3: reward model from {len(rankings)} rankings ({where})")
            if stats:
                self.folder.write_json("reward_data.json", stats)
                self.log(f"comparisons: {stats['pairs']} pairs, mean-rating gap >= "
                         f"{stats['min_margin']}; raters disagree on "
                         f"{100 * stats['rater_disagreement']:.1f}% of rater pairs")
            ray.get(self.trainer.add.remote(rankings_to_comparisons(rankings)))
            self.feedback.rm_stats = ray.get(self.trainer.train.remote(
                epochs=cfg.reward_model.initial_epochs, threads=cfg.run.stage_threads or 0))
        else:
            have = self.feedback.requested = self.feedback.load_stored()
            want = max(0, cfg.labels.initial - have)
            self.log(f"stage 2/3: reward model from {have} stored and {want} new rankings of "
                     "SFT samples")
            self.ask_for_labels(want, block=True)
            if cfg.labeler.source != "oracle":
                self.feedback.wait_for_labels(cfg.labels.initial)
            self.feedback.feed(block=True, epochs=cfg.reward_model.initial_epochs,
                               threads=cfg.run.stage_threads or 0)
        out = self.folder.loc("reward_model")
        ray.get(self.trainer.save.remote(out))
        acc = self.feedback.rm_stats.get("rm_val_accuracy")
        self.log(f"reward model: val accuracy {'-' if acc is None else format(acc, '.3f')}")
        return out

    def calibrate(self) -> None:
        """Reward normalization: the reward model's mean and std on SFT samples of the
        held-out prompts (InstructGPT normalizes so that the SFT model scores 0 on average),
        measured again for each new reward-model version (`ScoreNormalizer`). The same
        samples are the SFT model's held-out evaluation."""
        raw, samples, version = self.held_out.judge_sft(self.generation, self.rm_handle)
        self.norm.calibrate([x["prompt"] for x in samples], [x["response"] for x in samples],
                            [x["finished"] for x in samples], raw, version)
        if self.cfg.ppo.normalize_reward and self.cfg.model.critic_init == "reward_model":
            self.learner.fold_reward_normalization(self.norm.mean, self.norm.std)  # its values
        self.sft_oracle = self.held_out.sft.get("eval_score_mean")

    def ppo(self, online: bool) -> dict:
        cfg = self.cfg
        self.log(f"stage 3/3: PPO for {cfg.run.iterations} iterations")
        judge = self.held_out.yardstick()  # never trained on, never the training signal
        if judge is None:
            self.log("no eval.yardstick or labeler.oracle: held-out evaluations report the "
                     "reward model's score (the training signal) and the KL only")
        self.t_start = time.time()  # time_s counts PPO's time
        last: dict = {}
        batch, k = cfg.ppo.rollout_batch_size, cfg.ppo.samples_per_prompt
        pending = None  # async_generation: the next batch, sampled while the learner steps
        # the sampler's log-probs: PPO's old ones, or compared with the learner's (sampler_kl)
        with_lp = (cfg.ppo.old_logprobs == "generation" or cfg.generation.backend == "vllm"
                   or cfg.ppo.async_generation or cfg.ppo.importance_sampling_cap is not None)
        if (cfg.ppo.async_generation and cfg.ppo.old_logprobs == "learner"
                and cfg.ppo.importance_sampling_cap is None):
            self.log("warning: ppo.async_generation with ppo.old_logprobs=learner: PPO's old "
                     "log-probs are the learner's, one version ahead of the sampler, with no "
                     "correction (sampler_kl measures the gap); set ppo.importance_sampling_cap "
                     "(truncated importance sampling) or ppo.old_logprobs=generation")
        while self.iteration < cfg.run.iterations and not self.should_stop():
            timer = PhaseTimer()
            self.queries_from_rollout = 0
            # 1. samples of policy v (generated while the last step ran, with async_generation)
            out = self.generation.collect(pending or self.generation.submit(
                self.next_prompts(batch), n=k, logprobs=with_lp))
            pending = None
            timer.mark("generate")
            # 2. scores from the reward model's deployment, normalized (on its version's
            #    scores of SFT samples) and clipped
            scored, scores = self.norm.score(self.rm_handle, out["prompts"], out["texts"],
                                             out["finished"])
            if cfg.ppo.missing_eos_penalty:  # in normalized units, after the clip
                scores = scores - cfg.ppo.missing_eos_penalty * ~np.asarray(out["finished"])
            raw = np.asarray(scored["scores"], dtype=np.float64)
            if cfg.ppo.advantage_estimator != "gae":  # critic-free: less the group baseline,
                # here where the whole batch's groups are (the learner ranks get rows)
                scores = shape_scores(cfg.ppo.advantage_estimator,
                                      torch.as_tensor(scores, dtype=torch.float64), k).numpy()
            timer.mark("score")
            if cfg.ppo.async_generation and self.iteration + 1 < cfg.run.iterations:
                # still policy v: its log-probs make PPO's ratio against the sampler
                pending = self.generation.submit(self.next_prompts(batch), n=k,
                                                 logprobs=with_lp)
            # 3. PPO on KL-penalized token rewards, then the KL controller
            beta = self.kl_ctl.beta
            stats = self.learner.step(out, scores, beta)
            timer.mark("learner")
            self.kl_ctl.update(stats["kl_mean"], len(out["prompts"]))
            # 4. policy v + 1 to every generation worker
            version, weights = self.learner.policy_weights()
            self.generation.push(version, weights)
            timer.mark("sync")
            self.iteration += 1
            # 5. rankings of fresh samples asked for; a refit on new ones, asynchronously
            if online:
                self.feedback.expire_overdue()
                if cfg.labels.per_iteration:
                    # the rollout's groups, where they are as large as a ranking query
                    same_k = k == cfg.labels.responses_per_query
                    asked = self.ask_for_labels(cfg.labels.per_iteration, block=False,
                                                groups=out if same_k else None)
                    self.queries_from_rollout = asked if same_k else 0
                    self.feedback.feed()
            timer.mark("labeling")
            # 6. metrics (the yardstick on held-out prompts now and then), checkpoint
            judged = None if judge is None else judge.score(out["prompts"], out["texts"])["score"]
            row = iteration_row(self, Step(out, scored, raw, judged, stats, beta, version, timer))
            done = self.iteration >= cfg.run.iterations or self.should_stop()
            if (cfg.eval.every and self.iteration % cfg.eval.every == 0) or done:
                row.update(self.held_out.row(self.iteration, done, self.generation,
                                             self.rm_handle))
            last = self.emit(row)
            every = cfg.run.checkpoint_every
            if every and self.iteration % every == 0 and self.iteration < cfg.run.iterations:
                self.checkpoint()
        self.feedback.finish_round()
        self.checkpoint(final=self.iteration >= cfg.run.iterations)
        write_resources(self)
        return last

    # ---------------------------------------------------------------- roles
    def start_reward_roles(self, rm_init_path: str, with_labeler: bool) -> None:
        """The weight store, the LM reward trainer (from `rm_init_path`) and, for runs that
        collect preferences, the labeler and its page."""
        cfg, place = self.cfg, self.cfg.placement
        weights = remote_role(WeightStore, place.labeler, name=self.names.weights).remote(2)
        self.trainer = remote_role(LMRewardTrainer, place.reward_trainer,
                                   self.bundle("reward_trainer"), pg=self.pg).remote(
            rm_init_path, cfg.reward_model, max_prompt_tokens=cfg.data.max_prompt_tokens,
            max_response_tokens=rm_max_response_tokens(cfg), seed=cfg.seed,
            # it refits beside the learner: the CPUs it reserves (its first fit, alone,
            # takes the node's: stage_threads)
            torch_threads=max(1, int(place.reward_trainer.num_cpus)), dtype=cfg.model.dtype,
            train_top_layers=cfg.model.train_top_layers, device=place.devices()["reward_trainer"])
        self.actors += [weights, self.trainer]
        self.feedback.attach(self.trainer, weights)
        if with_labeler:
            self.feedback.start()
        ray.get(weights.get_version.remote())

    def deploy_reward_model(self, rm_path: str) -> None:
        """Without waiting: the replica starts while the learners load (each role's process
        start is mostly imports); `run` waits for it before PPO starts."""
        self.rm_handle = serve_lm.deploy(
            rm_path, app_name=self.names.reward_app, weight_store=self.names.weights,
            namespace=ray.get_runtime_context().namespace, serve_cfg=self.cfg.placement.reward_model,
            torch_threads=self.cfg.run.torch_threads,
            max_prompt_tokens=self.cfg.data.max_prompt_tokens,
            max_response_tokens=rm_max_response_tokens(self.cfg), wait=False,
            dtype=self.cfg.model.dtype)
        self.apps.append(self.names.reward_app)

    def start_generation(self, policy_path: str, adapter_path: str | None = None) -> None:
        self.generation = GenerationGroup(self.cfg, policy_path, self.bundle, self.pg, adapter_path)
        self.actors += self.generation.workers

    def start_learners(self, start: StartPoints) -> None:
        """N ranks of one torch.distributed group; the reference is the SFT model."""
        self.learner = LearnerGroup(self.cfg, start.policy, start.critic, self.sft_path,
                                    self.bundle, self.pg, start.optimizer, start.adapter)
        self.actors += self.learner.ranks
        self.held_out.text_ppl = self.learner.text_perplexity  # the alignment tax

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

    def ask_for_labels(self, n_prompts: int, block: bool, groups: dict | None = None) -> int:
        """K samples for each of n prompts from the current policy -> ranking queries.
        `groups`: a rollout sampled K per prompt (`ppo.samples_per_prompt` = K): its first n
        groups are the queries, nothing is generated for them (group sampling done once for
        the baseline and the labels)."""
        cfg = self.cfg
        n_prompts = min(n_prompts, cfg.labels.budget - self.feedback.requested)
        if n_prompts <= 0 or self.labeler is None:
            return 0
        k = cfg.labels.responses_per_query
        if groups is not None:
            n_prompts = min(n_prompts, len(groups["prompts"]) // k)
            out = groups
            prompts = [groups["prompts"][i * k] for i in range(n_prompts)]
        else:
            prompts = self.next_prompts(n_prompts)
            out = self.generation.generate(prompts, n=k)
        responses = [out["texts"][i * k:(i + 1) * k] for i in range(n_prompts)]
        ended = [list(out["finished"][i * k:(i + 1) * k]) for i in range(n_prompts)]
        self.feedback.ask(n_prompts, prompts, responses, ended, block=block)
        return n_prompts

    # ---------------------------------------------------------------- checkpoints
    def checkpoint(self, final: bool = False) -> str:
        """Policy, critic and their optimizer moments (rank 0), the reward model, the KL
        controller, the prompt order and position; queries in flight reach the store first."""
        self.feedback.settle()
        path = self.folder.checkpoint_dir(self.iteration, final)
        self.learner.save(path, self.sft_path)
        ray.get(self.trainer.save.remote(locations.join(path, "reward_model")))
        return self.save_state(path, {
            "kl_controller": self.kl_ctl.state_dict(), "prompt_cursor": self.cursor,
            "prompt_order": [int(i) for i in self.order], **self.norm.state(),
            "sft_oracle": self.sft_oracle,
            **self.held_out.state(),
            "sft_path": str(self.sft_path), "kl_settings": self.cfg.ppo.kl.model_dump(mode="json")})

    def restore(self, ckpt: str, override_kl: bool = False) -> dict:
        """The controller's part of a checkpoint; the roles load the rest as they start."""
        state = self.load_state(ckpt)
        kl_now = self.cfg.ppo.kl.model_dump(mode="json")
        self.kl_ctl = kl_controller_from_state(state["kl_controller"])
        if override_kl or state.get("kl_settings", kl_now) != kl_now:
            # the KL settings changed since the checkpoint (a PBT mutation, an override on
            # resume): the controller starts from the new settings
            self.kl_ctl = kl_controller(self.cfg.ppo.kl)
        self.cursor = int(state["prompt_cursor"])
        if state.get("prompt_order"):
            self.order = np.asarray(state["prompt_order"])
        self.norm.restore(state, self.run_dir / "samples_sft.jsonl")
        self.sft_oracle = None if state["sft_oracle"] is None else float(state["sft_oracle"])
        self.held_out.restore(state, self.iteration)
        self.log(f"resuming from {ckpt} at iteration {self.iteration}")
        return state

