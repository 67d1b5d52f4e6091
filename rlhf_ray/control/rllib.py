"""Where RLHF meets RLlib's new API stack.

- `RewardRelabel`: a learner connector that replaces every env reward in the train batch with
  the reward model's prediction, batch-scored through the Serve deployment handle, before GAE
  runs. The env reward is kept aside as the yardstick (logged, never trained on).
- `SegmentSampler`: an EnvRunner callback (`on_sample_end`) that cuts each sampled episode
  chunk into k-step segments, with raw observations, actions, true rewards and simulator state,
  and ships them to the segment pool in one call per sample (never per step).
- `build_ppo_config`: the RLlib `PPOConfig` from our config tree; placement comes from
  `cfg.placement`, nothing is hard-coded.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rlhf_ray.control.config import ControlConfig
from rlhf_ray.control.envs import (
    ENV_NAME,
    INFO_KEY,
    EnvProbe,
    InfoLayout,
    atari_to_uint8,
)
from rlhf_ray.control.policy import PPOPolicyModule
from rlhf_ray.control.serve import score_chunks
from rlhf_ray.core.segments import SegmentBatch, cut_segments
from rlhf_ray.runtime.scoring import pinned_version


@dataclass(frozen=True)
class RelabelTarget:
    """Where the learner connector gets rewards: the reward model's Serve application and
    deployment, and its weight store's actor (name, namespace) for pinning versions."""

    app_name: str
    deployment_name: str
    weight_store: str | None = None  # None: no pinning (one replica, fixed weights)
    namespace: str | None = None


@dataclass(frozen=True)
class SegmentSource:
    """How the env runners cut segments for the query pool after each sample: the pool's
    actor (name, namespace), the segment length, how many segments a sample offers, the
    env's info layout (None: Atari frames), the seed and the action bounds."""

    pool_name: str
    namespace: str
    length: int
    per_sample: int
    layout: InfoLayout | None
    seed: int
    action_bounds: tuple | None = None


def episode_arrays(ep: Any, num_steps: int, layout: InfoLayout | None, with_state: bool,
                   action_bounds: tuple | None = None) -> dict[str, np.ndarray]:
    """The first `num_steps` real steps of an RLlib SingleAgentEpisode as arrays.

    obs[t] is the (unfiltered) observation in which actions[t] was taken; true_rewards[t] the
    env reward that followed. `layout` unpacks `info["rlhf"]` (raw obs, MuJoCo state); None
    means Atari, whose stacked frames are the observations themselves. Continuous actions are
    clipped to `action_bounds`, the action the env really executed: RLlib stores the raw
    Gaussian sample, and a reward model fed raw actions can be exploited by actions far
    outside the bounds that change nothing physically.
    """
    idx = slice(0, num_steps)
    out: dict[str, np.ndarray] = {}
    if layout is None:
        out["obs"] = atari_to_uint8(ep.get_observations(idx))
    elif num_steps:
        unpacked = layout.unpack(np.stack([i[INFO_KEY] for i in ep.get_infos(idx)]))
        out["obs"] = unpacked.pop("obs")
        if with_state:
            out.update(unpacked)
    else:
        out["obs"] = np.zeros((0, *layout.obs_shape), dtype=np.float32)
    actions = np.asarray(ep.get_actions(idx))
    if action_bounds is not None:
        actions = np.clip(actions, action_bounds[0], action_bounds[1]).astype(np.float32)
    out["actions"] = actions
    out["true_rewards"] = np.asarray(ep.get_rewards(idx), dtype=np.float32)
    return out


# --------------------------------------------------------------------------- learner connector


def _connector_base():
    from ray.rllib.connectors.connector_v2 import ConnectorV2

    return ConnectorV2


class _LazyHandle:
    """A Serve handle (and the weight store's actor) resolved on first use in whichever
    process the learner runs."""

    def __init__(self, app_name: str, deployment_name: str,
                 weight_store: tuple[str, str] | None = None):
        self.app_name, self.deployment_name = app_name, deployment_name
        self.weight_store = weight_store
        self._handle = self._store = None

    def get(self):
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle(self.deployment_name, self.app_name)
        return self._handle

    def store(self):
        if self._store is None and self.weight_store is not None:
            import ray

            self._store = ray.get_actor(self.weight_store[0], namespace=self.weight_store[1])
        return self._store


def make_relabel_connector(target: RelabelTarget, layout: InfoLayout | None,
                           chunk_size: int = 2048, action_bounds: tuple | None = None):
    """Factory for `AlgorithmConfig.learners(learner_connector=...)`. Every relabelling call
    pins its requests to the version the target's weight store has published when it
    starts, so one PPO update's rewards all come from one version however many replicas
    score them."""
    base = _connector_base()

    class RewardRelabel(base):
        """Rewrites episode rewards with r_hat(o, a) from the reward-model deployment.

        PPOLearner prepends a connector that adds one bootstrap step to every episode, so an
        episode of T real steps arrives here with length T + 1; only the T real steps are
        relabelled (the extra step is masked out of the loss).
        """

        def __init__(self, input_observation_space=None, input_action_space=None, **kw):
            super().__init__(input_observation_space, input_action_space, **kw)
            store = (target.weight_store, target.namespace) if target.weight_store else None
            self.handle = _LazyHandle(target.app_name, target.deployment_name, store)

        def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None,
                     metrics=None, **kwargs):
            t0 = time.perf_counter()
            real = [max(0, len(ep) - 1) for ep in episodes]
            arrays = [episode_arrays(ep, n, layout, with_state=False, action_bounds=action_bounds)
                      for ep, n in zip(episodes, real) if n > 0]
            if not arrays:
                return batch
            obs = np.concatenate([a["obs"] for a in arrays])
            act = np.concatenate([a["actions"] for a in arrays])
            true_r = np.concatenate([a["true_rewards"] for a in arrays])
            handle = self.handle.get()
            version = pinned_version(self.handle.store())
            results = score_chunks(handle, obs, act, chunk_size, version=version)
            versions = {int(r["version"]) for r in results}
            pred = np.concatenate([r["reward"] for r in results]).astype(np.float32)
            offset = 0
            for ep, n in zip(episodes, real):
                if n > 0:
                    ep.set_rewards(new_data=pred[offset:offset + n], at_indices=slice(0, n))
                    offset += n
            if metrics is not None:
                metrics.log_value("rlhf/pred_reward_mean", float(pred.mean()), window=1)
                metrics.log_value("rlhf/true_reward_mean", float(true_r.mean()), window=1)
                metrics.log_value("rlhf/rm_version", min(versions), reduce="max", window=1)
                # versions one relabelling call mixed: 0 unless pinning broke
                metrics.log_value("rlhf/rm_versions_mixed", len(versions) - 1, reduce="sum")
                metrics.log_value("rlhf/relabelled_steps", int(len(pred)), reduce="sum")
                metrics.log_value("rlhf/relabel_s", time.perf_counter() - t0, window=1)
            return batch

    return RewardRelabel


def make_standardize_connector(output_std: float):
    """Factory for `AlgorithmConfig.learners(learner_connector=...)` on the true-reward
    baseline `run.reward=env_standardized`: each train batch's env rewards shifted and
    scaled to zero mean and std `output_std` over its real steps, as the reward model's
    members are normalized on recent transitions before the policy sees them."""
    base = _connector_base()

    class StandardizeReward(base):
        def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None,
                     metrics=None, **kwargs):
            kept = [(ep, len(ep) - 1) for ep in episodes if len(ep) > 1]  # real steps
            parts = [np.asarray(ep.get_rewards(slice(0, n)), np.float32) for ep, n in kept]
            if not parts:
                return batch
            allr = np.concatenate(parts)
            mean, std = float(allr.mean()), float(allr.std()) or 1.0
            for (ep, n), r in zip(kept, parts):
                ep.set_rewards(new_data=(r - mean) / std * output_std, at_indices=slice(0, n))
            if metrics is not None:
                metrics.log_value("rlhf/true_reward_mean", mean, window=1)
            return batch

    return StandardizeReward


# --------------------------------------------------------------------------- env-runner callback


def sample_segments(episodes: list, src: SegmentSource) -> SegmentBatch | None:
    """Cut segments from one EnvRunner.sample() result and send them to the pool."""
    import ray

    rng = np.random.default_rng([src.seed, int.from_bytes(np.random.bytes(4), "little")])
    long_enough = [ep for ep in episodes if len(ep) >= src.length]
    if not long_enough:
        return None
    steps = np.array([len(ep) for ep in long_enough], dtype=np.float64)
    # spread the per-sample quota over chunks in proportion to their length
    quota = np.maximum(1, np.round(src.per_sample * steps / steps.sum())).astype(int)
    batches = []
    for ep, q in zip(long_enough, quota):
        arrays = episode_arrays(ep, len(ep), src.layout, with_state=True,
                                action_bounds=src.action_bounds)
        b = cut_segments(arrays, src.length, int(q), rng)
        if b is not None:
            batches.append(b)
    if not batches:
        return None
    batch = SegmentBatch.concat(batches)
    pool = ray.get_actor(src.pool_name, namespace=src.namespace)
    pool.add.remote(batch)
    return batch


def _on_sample_end(*, env_runner=None, metrics_logger=None, samples=None, rlhf=None, **kw):
    if rlhf is None or not samples:
        return
    t0 = time.perf_counter()
    batch = sample_segments(list(samples), rlhf)
    if metrics_logger is not None and batch is not None:
        metrics_logger.log_value("rlhf/segments_sampled", len(batch), reduce="sum")
        metrics_logger.log_value("rlhf/segment_cut_s", time.perf_counter() - t0, window=1)


# --------------------------------------------------------------------------- PPO config


def build_ppo_config(cfg: ControlConfig, probe: EnvProbe, *, relabel: RelabelTarget | None,
                     segments: SegmentSource | None):
    """RLlib PPOConfig for this run.

    probe: the run's `envs.probe` (layout and action bounds for relabelling). relabel: the
    reward model to relabel rewards with, or None to train on the env reward (the
    true-reward baseline). segments: where the env runners send segments, or None.
    """
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    p, place = cfg.ppo, cfg.placement
    atari = cfg.env.preprocessing == "atari"
    model = DefaultModelConfig(
        fcnet_hiddens=list(p.hidden), fcnet_activation=p.activation,
        vf_share_layers=p.vf_share_layers,
        **({"conv_filters": [[16, 4, 2], [32, 4, 2], [64, 4, 2], [128, 4, 2]],
            "conv_activation": "relu", "head_fcnet_hiddens": [256]} if atari else {}),
    )
    env_runner_kw: dict[str, Any] = {
        "num_env_runners": place.num_env_runners,
        "num_envs_per_env_runner": cfg.env.num_envs_per_env_runner,
        "num_cpus_per_env_runner": place.env_runner.num_cpus,
        "num_gpus_per_env_runner": place.env_runner.num_gpus,
        "rollout_fragment_length": "auto",
    }
    if place.env_runner.resources:
        env_runner_kw["custom_resources_per_env_runner"] = dict(place.env_runner.resources)
    if cfg.ppo.obs_filter == "MeanStdFilter" and not atari:
        from ray.rllib.connectors.env_to_module import MeanStdFilter

        env_runner_kw["env_to_module_connector"] = lambda env, spaces=None, device=None: MeanStdFilter()
    learner_kw: dict[str, Any] = {
        "num_learners": place.num_learners,
        "num_cpus_per_learner": place.learner.num_cpus if place.num_learners else "auto",
        "num_gpus_per_learner": place.learner.num_gpus,
    }
    if place.learner.resources and place.num_learners:
        learner_kw["custom_resources_per_learner"] = dict(place.learner.resources)
    if relabel is not None:
        connector = make_relabel_connector(relabel, probe.layout,
                                           action_bounds=probe.action_bounds)
    elif cfg.run.reward == "env_standardized":
        connector = make_standardize_connector(cfg.reward_model.output_std)
    else:
        connector = None
    if connector is not None:
        learner_kw["learner_connector"] = lambda obs_space, act_space: connector(obs_space, act_space)
    # Rollout workers yield to the labeling path only while people label; with the oracle
    # they are the critical path and keep their priority (the reward trainer still yields).
    rollout_nice = cfg.placement.batch_nice if cfg.labeler.source != "oracle" else 0
    config = (
        PPOConfig()
        .environment(ENV_NAME, env_config={**cfg.env.model_dump(mode="json"),
                                           "_nice": rollout_nice,
                                           "_rlhf_info": relabel is not None or segments is not None})
        .framework("torch")
        .env_runners(**env_runner_kw)
        .learners(**learner_kw)
        .training(
            train_batch_size_per_learner=p.train_batch_size // max(1, place.num_learners),
            minibatch_size=p.minibatch_size, num_epochs=p.num_epochs, lr=p.lr, gamma=p.gamma,
            lambda_=p.lambda_, clip_param=p.clip_param, vf_clip_param=p.vf_clip_param,
            vf_loss_coeff=p.vf_loss_coeff, entropy_coeff=p.entropy_coeff,
            use_kl_loss=p.use_kl_loss, kl_coeff=p.kl_coeff, kl_target=p.kl_target,
            grad_clip=p.grad_clip,
        )
        .rl_module(rl_module_spec=RLModuleSpec(
            module_class=PPOPolicyModule,
            model_config={**asdict(model), "log_std_init": p.log_std_init}))
        .debugging(seed=cfg.seed, log_level="ERROR")
        # a dead rollout worker is restarted by Ray; RLlib waits this long per iteration for
        # it to answer before sampling from the healthy ones (its default, 30 s, stalls every
        # iteration while a lost node's worker cannot be placed)
        .fault_tolerance(restart_failed_env_runners=True,
                         env_runner_health_probe_timeout_s=place.env_runner_probe_timeout_s)
    )
    if segments is not None:
        config.callbacks(on_sample_end=functools.partial(_on_sample_end, rlhf=segments))
    return config


# --------------------------------------------------------------------------- PPO's KL coefficient


def kl_coeffs(algo) -> dict[str, float]:
    """PPO's current KL coefficient per module (the first learner's: all ranks agree). RLlib's
    checkpoints leave it out, so a resumed run would restart it from the config's value."""
    out = algo.learner_group.foreach_learner(
        lambda learner: {str(m): float(v) for m, v in learner.curr_kl_coeffs_per_module.items()})
    for result in out:  # RLlib's RemoteCallResults: one CallResult per learner
        return dict(result.get())
    return {}


def set_kl_coeffs(algo, coeffs: dict[str, float]) -> None:
    def put(learner, c=dict(coeffs)):
        for module_id, value in c.items():
            learner.curr_kl_coeffs_per_module[module_id].data.fill_(value)
        return True

    algo.learner_group.foreach_learner(put)


def reset_lrs(algo) -> None:
    """Every optimizer's learning rate from this run's config (its scheduler's current value).
    A restored optimizer state carries the checkpoint's rate; RLlib puts the configured one
    back only after the next update, so without this a resumed run with another `ppo.lr` (a
    PBT mutation, an override on resume) would take its first update at the old rate."""
    def put(learner):
        for optimizer, schedule in learner._optimizer_lr_schedules.items():
            learner._set_optimizer_lr(optimizer, schedule.get_current_value())
        return True

    algo.learner_group.foreach_learner(put)
