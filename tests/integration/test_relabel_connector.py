"""The learner connector replaces env rewards with the reward model's, and PPO trains on them."""

import uuid

import numpy as np
import torch

from rlhf_ray.config import load_config
from rlhf_ray.control import envs
from rlhf_ray.control.loop import reward_spec
from rlhf_ray.control.rllib_glue import build_ppo_config, make_relabel_connector
from rlhf_ray.metrics import find_metric
from rlhf_ray.reward_model import RewardEnsemble
from rlhf_ray.serve_rm import deploy
from rlhf_ray.weights import WeightStore


def probe_connector():
    from ray.rllib.connectors.connector_v2 import ConnectorV2

    class RewardProbe(ConnectorV2):
        """Runs after the relabeller: logs the rewards the rest of the pipeline (GAE) reads."""

        def __call__(self, *, rl_module, batch, episodes, metrics=None, **kw):
            rewards = np.concatenate([np.asarray(ep.get_rewards(slice(0, len(ep) - 1)))
                                      for ep in episodes if len(ep) > 1])
            metrics.log_value("probe/reward_min", float(rewards.min()), reduce="min", window=1)
            metrics.log_value("probe/reward_max", float(rewards.max()), reduce="max", window=1)
            metrics.log_value("probe/steps", len(rewards), reduce="sum")
            return batch

    return RewardProbe


def test_ppo_trains_on_relabelled_rewards(ray_cluster):
    ray = ray_cluster
    cfg = load_config("hopper-smoke", ["ppo.train_batch_size=400", "ppo.minibatch_size=100",
                                       "ppo.num_epochs=1", "placement.num_env_runners=0",
                                       "env.num_envs_per_env_runner=1"])
    spec = reward_spec(cfg)
    ens = RewardEnsemble(spec)
    with torch.no_grad():  # a reward model that says 3.25 everywhere
        for p in ens.parameters():
            p.zero_()
        for m in ens.members:
            m.body[-1].bias.fill_(3.25)
    name = f"ws-{uuid.uuid4().hex[:6]}"
    store = ray.remote(WeightStore).options(name=name, num_cpus=0).remote()
    ray.get(store.publish.remote(1, {k: v.numpy() for k, v in ens.flat_state().items()}))
    app = f"rm-relabel-{uuid.uuid4().hex[:6]}"
    deploy(spec, app_name=app, weight_store=name, namespace=ray.get_runtime_context().namespace,
           serve_cfg=cfg.placement.reward_model)
    envs.register()
    relabel = make_relabel_connector(app, "RewardModel", atari=False)
    probe = probe_connector()
    config = build_ppo_config(cfg, relabel=(app, "RewardModel"), segments=None)
    config.learners(learner_connector=lambda o, a: [relabel(o, a), probe(o, a)])
    algo = config.build_algo()
    try:
        result = algo.train()
    finally:
        algo.stop()
        from ray import serve

        serve.delete(app)
        ray.kill(store)
    # every reward GAE reads is the model's, not Hopper's (which varies step to step)
    assert find_metric(result, "probe/reward_min") == 3.25
    assert find_metric(result, "probe/reward_max") == 3.25
    assert find_metric(result, "rlhf/rm_version") == 1
    assert find_metric(result, "probe/steps") >= 400
    assert find_metric(result, "rlhf/relabelled_steps") == find_metric(result, "probe/steps")
    # the env reward is still measured separately (the yardstick)
    assert find_metric(result, "rlhf/true_reward_mean") != 3.25
    assert find_metric(result, "episode_return_mean") is not None or find_metric(result, "num_env_steps_sampled_lifetime")
