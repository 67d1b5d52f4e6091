"""The controller of the control workload: deep RL from human preferences on Ray.

Christiano et al. 2017, section 2.2: a policy acts in the env; people (or the synthetic
oracle) compare pairs of short trajectory segments; a reward-model ensemble is fitted to the
comparisons; the policy is trained by RL (PPO) on the predicted reward. The three run
asynchronously. `run()` is that loop:

  0. roles up: the reward model (a Serve deployment, batched), the labeler, the reward
     trainer, RLlib PPO (env runners = rollout workers, learner group = PPO learner);
  1. initial labels: segments of the initial policy, uniform pairs, labels, reward-model
     pretraining (or a checkpoint to continue from);
  2. per iteration: PPO on relabelled rewards -> labels due by the schedule -> queries
     chosen by ensemble disagreement -> labeler -> reward trainer (asynchronous) -> metrics
     -> checkpoint.

The run folder, Ray, metrics rows, resuming and the labeler are the shared layer's
(`rlhf_ray.runtime.controller`, `rlhf_ray.feedback`); RLlib's side is `control.rllib`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import ray
import torch

from rlhf_ray.control import envs
from rlhf_ray.control import labeling
from rlhf_ray.control import serve as serve_rm
from rlhf_ray.control.pool import SegmentPool
from rlhf_ray.control.evaluation import final_evaluation
from rlhf_ray.control.reward import RewardNetSpec, load_weights, save_weights
from rlhf_ray.control.reward_trainer import RewardTrainer
from rlhf_ray.control.metrics import CONTROL, find_metric
from rlhf_ray.control.rllib import (RelabelTarget, SegmentSource, build_ppo_config,
                                    kl_coeffs, reset_lrs, set_kl_coeffs)
from rlhf_ray.control.serve import DEPLOYMENT_NAME, segment_returns
from rlhf_ray.core.query_selection import select_queries
from rlhf_ray.core.schedule import LabelSchedule
from rlhf_ray.core.segments import default_segment_length
from rlhf_ray.feedback.loop import Feedback, by_label_growth
from rlhf_ray.runtime.actors import lower_priority, remote_role
from rlhf_ray.runtime.controller import RunController
from rlhf_ray.runtime.metrics import PhaseTimer, clean
from rlhf_ray.runtime.scoring import pinned_version
from rlhf_ray.runtime.serving import wait_running
from rlhf_ray.storage import locations
from rlhf_ray.storage.store import PreferenceStore
from rlhf_ray.storage.weights import WeightStore


# the reward trainer's statistics every row reports
RM_KEYS = ("rm_val_accuracy", "rm_train_accuracy", "rm_val_loss", "rm_train_loss", "rm_l2_mean",
           "rm_train_s")


class ControlController(RunController):
    """The run's state; `run()` is the loop."""

    metrics_table = CONTROL

    def __init__(self, cfg, run_dir=None, on_metrics=None, progress: bool = True,
                 stop_event=None, **kwargs):
        super().__init__(cfg, run_dir, on_metrics, progress, stop_event, **kwargs)
        self.schedule = LabelSchedule(cfg.labels.budget, cfg.labels.initial_fraction,
                                      cfg.labels.t0_steps, cfg.run.total_env_steps)
        self.env_steps = 0
        self.initial_env_steps = 0
        self.algo = None  # RLlib's Algorithm while the loop runs
        self.last_rm_version = 0

    @staticmethod
    def budget(cfg) -> tuple[str, str, int]:
        return "env_steps", "run.total_env_steps", cfg.run.total_env_steps

    # ------------------------------------------------------------------ the loop
    def run(self, resume_from: str | Path | None = None) -> dict:
        """The whole loop; `resume_from`: a checkpoint folder of this run to continue from."""
        cfg = self.cfg
        learned = cfg.run.reward == "learned"
        with self.session():
            envs.register()
            self.env = envs.probe(cfg.env.model_dump(mode="json"))  # built once, here
            self.seg_len = cfg.labels.segment_length or default_segment_length(
                self.env.dt, cfg.labels.segment_seconds, cfg.env.preprocessing == "atari")
            # 0. roles up; the reward model's replica starts while RLlib builds PPO
            if learned:
                self.start_reward_roles()
            self.algo = self.build_algo(learned)
            if learned:
                wait_running(self.names.reward_app)
            # 1. initial labels from the initial policy, then pretraining (or a checkpoint)
            if resume_from is not None:
                self.resume(str(resume_from))
            elif learned:
                self.initial_labels()
            # 2. the loop
            last: dict = {}
            while True:
                timer = PhaseTimer()
                result = self.algo.train()  # rollouts, relabelling through Serve, PPO update
                timer.mark("ppo_iteration")
                self.iteration += 1
                self.env_steps = int(find_metric(result, "num_env_steps_sampled_lifetime") or 0)
                if learned:
                    self.feedback.expire_overdue()
                    self.request_labels()  # due by the schedule, chosen by disagreement
                    self.feedback.feed()  # new labels to the reward trainer; a round if due
                timer.mark("labeling")
                last = self.emit(self.metrics(result, timer))
                done = self.env_steps >= cfg.run.total_env_steps or self.should_stop()
                every = cfg.run.checkpoint_every
                if done or (every and self.iteration % every == 0):
                    self.checkpoint()
                if done:
                    break
            if learned:
                self.feedback.finish_round()
            self.final_evaluation()
            return last

    def final_evaluation(self) -> dict | None:
        """The final policy on `run.final_eval_episodes` fresh episodes (`control/evaluation`):
        mean actions (the benchmark's yardstick) and sampled ones, the action noise, and the
        reward model's predicted return of those episodes against their true return."""
        n = self.cfg.run.final_eval_episodes
        if not n:
            return None
        learned = self.cfg.run.reward == "learned"
        version = pinned_version(self.feedback.weight_store) if learned else None
        out, first = final_evaluation(
            self.algo, self.env.layout, self.env.action_bounds, n,
            rm_handle=self.rm_handle if learned else None, version=version,
            sampled=self.cfg.run.final_eval_sampled)
        if first is not None:
            np.savez_compressed(self.run_dir / "final_episode.npz", **first)
        out.update({"env_steps": self.env_steps, "iteration": self.iteration})
        self.folder.write_json("final_eval.json", out)
        line = (f"final policy: true return {out['return_mean']:.1f} over {out['episodes']} "
                "fresh episodes (mean actions)")
        if "sampled" in out:
            line += f"; {out['sampled']['return_mean']:.1f} with sampled actions"
        self.log(line)
        return out

    # ------------------------------------------------------------------ 0. roles
    def start_reward_roles(self) -> None:
        cfg, place, names = self.cfg, self.cfg.placement, self.names
        self.spec = RewardNetSpec.for_env(cfg.reward_net(), self.env.observation_space,
                                          self.env.action_space, cfg.reward_model,
                                          cfg.score_area())
        weights = remote_role(WeightStore, place.labeler, name=names.weights).remote()
        self.pool = remote_role(SegmentPool, place.labeler, name=names.pool).remote(
            cfg.labels.pool_size, cfg.seed)
        self.feedback = Feedback(
            cfg, self.folder, names, kind=labeling.query_kind(cfg), rm_keys=RM_KEYS,
            round_rule=by_label_growth(cfg.reward_model.round_label_growth),
            page_helpers=labeling.clip_renderers)
        self.feedback.start()
        trainer = remote_role(RewardTrainer, place.reward_trainer, self.bundle("reward_trainer"),
                              nice=place.batch_nice).remote(
            self.spec, cfg.reward_model, cfg.seed, cfg.run.torch_threads)
        self.feedback.attach(trainer, weights)
        self.actors += [trainer, self.pool, weights]
        self.rm_handle = serve_rm.deploy(
            self.spec, app_name=names.reward_app, weight_store=names.weights,
            namespace=ray.get_runtime_context().namespace, serve_cfg=place.reward_model,
            torch_threads=cfg.run.torch_threads, wait=False)
        self.apps.append(names.reward_app)
        self.candidate_returns = serve_rm.SegmentReturnsCache(4 * cfg.labels.pool_size)

    def build_algo(self, learned: bool):
        """RLlib's PPO: env runners cut segments for the pool, the learner relabels rewards
        through the reward model's deployment (or trains on the env's: the baseline)."""
        cfg, place = self.cfg, self.cfg.placement
        relabel = segments = None
        if learned:
            namespace = ray.get_runtime_context().namespace
            segments = SegmentSource(self.names.pool, namespace, self.seg_len,
                                     cfg.labels.segments_per_sample, self.env.layout, cfg.seed,
                                     self.env.action_bounds)
            relabel = RelabelTarget(self.names.reward_app, DEPLOYMENT_NAME, self.names.weights,
                                    namespace)
        if place.num_learners == 0:  # the learner runs here
            if learned and cfg.labeler.source != "oracle":
                # Ray starts its workers (the labeling app, the labeler, Serve) at niceness
                # 15: a learner at 0 would starve the page
                lower_priority(place.batch_nice)
            # the threads its placement grants, no more (torch's default, one per core,
            # fights the reward trainer for them), unless told to use the idle rollout cores
            torch.set_num_threads(place.learner_threads or max(1, int(place.learner.num_cpus)))
        return build_ppo_config(cfg, self.env, relabel=relabel, segments=segments).build_algo()

    def stop(self) -> None:
        if self.algo is not None:
            self.algo.stop()
            self.algo = None
        super().stop()

    # ------------------------------------------------------------------ 1-2. labels
    def initial_labels(self) -> None:
        cfg = self.cfg
        # labels already in the store (a run resumed before its first checkpoint) count
        have = self.feedback.requested = self.feedback.load_stored()
        want = max(0, self.schedule.initial - have)
        # These env steps come out of the run's budget (the paper counts every interaction),
        # so sample no more than the queries need: one segment per query on average (uniform
        # pairs reuse segments), in calls sized to the segments a rollout batch offers.
        need = min(cfg.labels.pool_size, max(want, 32))
        runners = max(1, cfg.placement.num_env_runners)
        per_call = max(self.seg_len * 4, min(cfg.ppo.train_batch_size // runners,
                                             cfg.labels.segments_per_sample * self.seg_len))
        for calls in range(200):
            size = ray.get(self.pool.size.remote())
            if size >= need or (calls >= 10 and size < 2):
                break
            sampled = self.algo.env_runner_group.foreach_env_runner(
                lambda er, n=per_call: sum(len(e) for e in er.sample(num_timesteps=n)),
                local_env_runner=cfg.placement.num_env_runners == 0)
            self.initial_env_steps += int(sum(sampled))
        if ray.get(self.pool.size.remote()) < 2:
            raise RuntimeError(
                f"initial sampling ({self.initial_env_steps} env steps) produced fewer than 2 "
                f"segments of {self.seg_len} steps: episodes are shorter than a segment; set "
                "labels.segment_length lower or env.remove_termination=true")
        if want:
            self.submit_queries(want, method="uniform")
        # nothing else runs while the reward model pretrains: it takes the node's cores
        self.feedback.feed(block=True, steps=max(1, cfg.reward_model.pretrain_steps),
                           threads=cfg.run.stage_threads or 0)

    def request_labels(self) -> None:
        due = self.schedule.due(self.env_steps, self.feedback.requested)
        if due:  # uniform until the first reward model exists to disagree
            method = self.cfg.labels.query_selection
            self.submit_queries(due, method if self.feedback.rm_stats.get("rm_version") else "uniform")

    def submit_queries(self, n: int, method: str) -> None:
        """`n` pairs out of `n x oversampling` candidate pairs from the pool: the ones whose
        P(left > right) the ensemble members disagree on most (`variance`), or any."""
        cfg = self.cfg
        cand_n = min(cfg.labels.pool_size, max(2 * n * cfg.labels.oversampling, 2))
        cand = ray.get(self.pool.sample.remote(cand_n))
        if cand is None or len(cand) < 2:
            return
        if method == "variance":  # a candidate already scored under this version is not again
            version = pinned_version(self.feedback.weight_store)
            returns = self.candidate_returns.returns(
                cand, version, lambda b: segment_returns(self.rm_handle, b, version=version))
        else:
            returns = np.zeros((1, len(cand)))
        pairs = select_queries(returns, n, cfg.labels.oversampling, self.rng, method)
        self.feedback.ask(len(pairs), cand.take(pairs[:, 0]), cand.take(pairs[:, 1]))

    # ------------------------------------------------------------------ metrics
    def metrics(self, result: dict, timer: PhaseTimer) -> dict:
        ret = find_metric(result, "episode_return_mean")
        ep_len = find_metric(result, "episode_len_mean")
        timers = result.get("timers", {})
        m = {
            "iteration": self.iteration, "env_steps": self.env_steps,
            "initial_env_steps": self.initial_env_steps,
            "true_return_mean": clean(ret), "episode_len_mean": clean(ep_len),
            "kl_mean": clean(find_metric(result, "mean_kl_loss")),
            "kl_coef": clean(find_metric(result, "curr_kl_coeff")),
            # the policy's entropy (a Gaussian's grows with its action noise, log std per dim)
            "policy_entropy": clean(find_metric(result, "entropy")),
            "lr": clean(find_metric(result, "default_optimizer_learning_rate")),
            "time_s": self.elapsed_s(),
            **timer.seconds(),
            "sample_s": clean(find_metric(timers, "env_runner_sampling_timer")),
            "learn_s": clean(find_metric(timers, "learner_update_timer")),
        }
        if self.feedback is None:  # the true-reward baseline
            return {**m, "labels_total": 0, "pred_return_mean": None, "rm_val_accuracy": None,
                    "rm_version": 0}
        pred_r = find_metric(result, "rlhf/pred_reward_mean")
        version = find_metric(result, "rlhf/rm_version")
        if version is not None and np.isfinite(float(version)):
            # an iteration without relabelling (its only rollout worker died) keeps the
            # version last seen
            self.last_rm_version = int(version)
        cache = self.candidate_returns
        return {**m, **self.feedback.metrics(), "pred_reward_mean": clean(pred_r),
                "candidates_scored": cache.scored, "candidates_reused": cache.reused,
                "pred_return_mean": clean(pred_r * ep_len) if pred_r is not None and ep_len else None,
                "rm_version": self.last_rm_version,
                "rm_versions_mixed": int(clean(find_metric(result, "rlhf/rm_versions_mixed")) or 0),
                "relabel_s": clean(find_metric(result, "rlhf/relabel_s")),
                "segment_cut_s": clean(find_metric(result, "rlhf/segment_cut_s"))}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> str:
        """RLlib's algorithm (policy, critic, optimizer, filters), PPO's KL coefficient (not
        in RLlib's checkpoint), the reward ensemble with its normalizers, the query pool and
        the schedule's position. Labels are in the store already."""
        path = self.folder.checkpoint_dir(self.iteration)
        with locations.writable_dir(locations.join(path, "algo")) as algo_dir:
            self.algo.save_to_path(algo_dir)
        state = {"env_steps": self.env_steps, "initial_env_steps": self.initial_env_steps,
                 "segment_length": self.seg_len, "kl_coeffs": kl_coeffs(self.algo),
                 "ppo_settings": self.cfg.ppo.model_dump(mode="json")}
        if self.feedback is not None:
            snap = ray.get(self.pool.snapshot.remote())
            if snap["batch"] is not None:  # the query pool, as Parquet (never pickled)
                PreferenceStore(locations.join(path, "pool")).write_segments(snap["batch"])
            state["pool"] = {"rng": snap["rng"], "total_added": snap["total_added"]}
            # the last published round's ensemble and trainer state, from the weight store:
            # asking the trainer would wait for the round in flight (minutes on Atari); that
            # round is trained again after a resume, on labels the store keeps
            latest = ray.get(self.feedback.weight_store.latest.remote())
            if latest is None or latest[2] is None:  # nothing published with a state yet
                trainer = self.feedback.trainer
                latest = (*ray.get(trainer.weights.remote()), ray.get(trainer.state.remote()))
            version, weights, state["reward_trainer"] = latest
            with locations.writable_dir(path) as local:
                save_weights(os.path.join(local, "reward_model.safetensors"),
                             {k: torch.tensor(np.array(v)) for k, v in weights.items()},
                             self.spec, version)
        return self.save_state(path, state)

    def resume(self, ckpt: str) -> dict:
        """Continue from a checkpoint: the policy and PPO's state, the reward-model ensemble
        with its normalizers, L2 coefficients and version, every stored label (the store is
        reopened), the query pool, the schedule's position and the RNGs."""
        state = self.load_state(ckpt)
        self.algo.restore_from_path(locations.local_dir(locations.join(ckpt, "algo")))
        reset_lrs(self.algo)  # ppo.lr as configured now, not as the restored optimizer had it
        before = (state.get("ppo_settings") or {}).get("kl_coeff", self.cfg.ppo.kl_coeff)
        if state.get("kl_coeffs") and before == self.cfg.ppo.kl_coeff:
            set_kl_coeffs(self.algo, state["kl_coeffs"])
        # else: kl_coeff changed since the checkpoint (a PBT mutation, an override on
        # resume): PPO's adaptive coefficient starts again from the new setting
        self.env_steps = int(state.get("env_steps", 0))
        self.initial_env_steps = int(state["initial_env_steps"])
        self.seg_len = int(state.get("segment_length", self.seg_len))
        if self.feedback is None:
            return state

        weights, _, _ = load_weights(locations.local_file(locations.join(ckpt, "reward_model.safetensors")))
        ray.get(self.feedback.trainer.restore.remote({k: v.numpy() for k, v in weights.items()},
                                                     state["reward_trainer"]))
        self.feedback.load_stored()
        self.feedback.publish()
        if locations.is_dir(locations.join(ckpt, "pool")):
            batch = PreferenceStore(locations.join(ckpt, "pool")).segments()
            ray.get(self.pool.restore.remote({"batch": batch, **state["pool"]}))
        self.feedback.restore(state)
        return state
