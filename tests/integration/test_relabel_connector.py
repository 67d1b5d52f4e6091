"""The learner connector replaces env rewards with the reward model's, and PPO trains on them."""

import uuid

import numpy as np
import torch

from rlhf_ray.config import load_config
from rlhf_ray.control import envs
from rlhf_ray.control.metrics import find_metric
from rlhf_ray.control.reward import RewardEnsemble, RewardNetSpec
from rlhf_ray.control.rllib import (
    RelabelTarget,
    build_ppo_config,
    make_relabel_connector,
)
from rlhf_ray.control.serve import deploy
from rlhf_ray.storage.weights import WeightStore


def reward_spec(cfg) -> RewardNetSpec:
    probe = envs.probe(cfg.env.model_dump(mode="json"))
    return RewardNetSpec.for_env(cfg.reward_net(), probe.observation_space, probe.action_space,
                                 cfg.reward_model)


def probe_connector():
    from ray.rllib.connectors.connector_v2 import ConnectorV2

    class RewardProbe(ConnectorV2):
        """Runs after the relabeller: logs the rewards the rest of the pipeline (GAE) reads,
        and how far each is from the first raw observation feature of its own step."""

        def __call__(self, *, rl_module, batch, episodes, metrics=None, **kw):
            eps = [ep for ep in episodes if len(ep) > 1]
            rewards = np.concatenate([np.asarray(ep.get_rewards(slice(0, len(ep) - 1))) for ep in eps])
            # info["rlhf"] packs the raw observation first: [0] is raw obs[0]
            obs0 = np.concatenate([[i["rlhf"][0] for i in ep.get_infos(slice(0, len(ep) - 1))]
                                   for ep in eps])
            metrics.log_value("probe/reward_min", float(rewards.min()), reduce="min", window=1)
            metrics.log_value("probe/reward_max", float(rewards.max()), reduce="max", window=1)
            metrics.log_value("probe/max_err_vs_obs0", float(np.abs(rewards - obs0).max()),
                              reduce="max", window=1)
            metrics.log_value("probe/steps", len(rewards), reduce="sum")
            return batch

    return RewardProbe


def identity_of_obs0(ens: RewardEnsemble) -> None:
    """Weights that make every member output exactly obs[0] (LeakyReLU(x) - LeakyReLU(-x) = 1.01x)."""
    with torch.no_grad():
        for p in ens.parameters():
            p.zero_()
        for m in ens.members:
            linears = [layer for layer in m.body if isinstance(layer, torch.nn.Linear)]
            first, *middle, last = linears
            first.weight[0, 0], first.weight[1, 0] = 1.0, -1.0
            for lin in middle:
                lin.weight[0, 0], lin.weight[0, 1] = 1 / 1.01, -1 / 1.01
                lin.weight[1, 0], lin.weight[1, 1] = -1 / 1.01, 1 / 1.01
            last.weight[0, 0], last.weight[0, 1] = 1 / 1.01, -1 / 1.01


def one_ppo_iteration(ray, cfg, spec, ens) -> dict:
    """Serve `ens` as version 1, run one PPO iteration relabelled through it, tear down."""
    name = f"ws-{uuid.uuid4().hex[:6]}"
    store = ray.remote(WeightStore).options(name=name, num_cpus=0).remote()
    ray.get(store.publish.remote(1, {k: v.numpy() for k, v in ens.flat_state().items()}))
    app = f"rm-relabel-{uuid.uuid4().hex[:6]}"
    deploy(spec, app_name=app, weight_store=name, namespace=ray.get_runtime_context().namespace,
           serve_cfg=cfg.placement.reward_model)
    envs.register()
    env = envs.probe(cfg.env.model_dump(mode="json"))
    relabel = make_relabel_connector(RelabelTarget(app, "RewardModel"), env.layout)
    probe = probe_connector()
    config = build_ppo_config(cfg, env, relabel=RelabelTarget(app, "RewardModel"), segments=None)
    config.learners(learner_connector=lambda o, a: [relabel(o, a), probe(o, a)])
    algo = config.build_algo()
    try:
        result = algo.train()
    finally:
        algo.stop()
        from ray import serve

        serve.delete(app)
        ray.kill(store)
    return result


def test_relabelled_reward_belongs_to_its_own_step(ray_cluster):
    """r_hat(o_t, a_t) lands at step t: with a model that returns o_t[0] (Hopper's torso
    height, different every step), each relabelled reward equals its own step's observation."""
    ray = ray_cluster
    cfg = load_config("hopper-smoke", ["ppo.train_batch_size=400", "ppo.minibatch_size=100",
                                       "ppo.num_epochs=1", "placement.num_env_runners=0",
                                       "env.num_envs_per_env_runner=2"])
    spec = reward_spec(cfg)
    ens = RewardEnsemble(spec)
    identity_of_obs0(ens)
    x = torch.randn(5, *spec.obs_shape)
    assert torch.allclose(ens.member_rewards(x, torch.zeros(5, spec.act_dim))[0], x[:, 0], atol=1e-5)
    result = one_ppo_iteration(ray, cfg, spec, ens)
    assert find_metric(result, "probe/max_err_vs_obs0") < 1e-4
    assert find_metric(result, "probe/reward_max") - find_metric(result, "probe/reward_min") > 0.01


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
    result = one_ppo_iteration(ray, cfg, spec, ens)
    # every reward GAE reads is the model's, not Hopper's (which varies step to step)
    assert find_metric(result, "probe/reward_min") == 3.25
    assert find_metric(result, "probe/reward_max") == 3.25
    assert find_metric(result, "rlhf/rm_version") == 1
    assert find_metric(result, "probe/steps") >= 400
    assert find_metric(result, "rlhf/relabelled_steps") == find_metric(result, "probe/steps")
    # the env reward is still measured separately (the yardstick)
    assert find_metric(result, "rlhf/true_reward_mean") != 3.25
    assert find_metric(result, "episode_return_mean") is not None or find_metric(result, "num_env_steps_sampled_lifetime")
