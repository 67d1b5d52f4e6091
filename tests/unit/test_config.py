import subprocess
import sys

import pytest

from rlhf_ray.config import load_config, preset_names
from rlhf_ray.errors import ConfigError


def test_every_preset_validates():
    names = preset_names()
    for want in ("hopper", "halfcheetah", "pong", "hopper-smoke", "halfcheetah-smoke", "pong-smoke"):
        assert want in names
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


def test_overrides_are_typed():
    cfg = load_config("hopper-smoke", ["labels.budget=99", "ppo.hidden=[32,32]", "reward_model.adapt_l2=false"])
    assert cfg.labels.budget == 99 and cfg.ppo.hidden == [32, 32] and cfg.reward_model.adapt_l2 is False
    assert cfg.env.id == "Hopper-v5"  # from the base preset


@pytest.mark.parametrize("override,fragment", [
    ("labels.budgt=3", "labels.budgt: unknown key"),
    ("labels.budget=many", "labels.budget='many'"),
    ("labels.budget=0", "labels.budget=0: Input should be greater than or equal to 1"),
    ("env.id=NoSuchEnv-v0", "env.id='NoSuchEnv-v0': not a registered gymnasium env"),
    ("ppo.minibatch_size=300", "ppo.minibatch_size=300: must divide ppo.train_batch_size=2000"),
    ("labels.query_selection=max", "labels.query_selection='max'"),
    ("placement.reward_model.autoscaling={min_replicas: 3, max_replicas: 2}",
     "min_replicas 3 > max_replicas 2"),
    ("labeler.route_prefix=label", "labeler.route_prefix='label'"),
])
def test_bad_config_messages_name_field_and_value(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("hopper-smoke", [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override,fragment", [
    ("ppo.importance_sampling_cap=2",
     "ppo.importance_sampling_cap: needs ppo.old_logprobs=learner"),
    ("ppo.importance_sampling_cap=0.5",
     "ppo.importance_sampling_cap=0.5: Input should be greater than 1"),
    ("generation.backend=sglang", "generation.backend='sglang'"),
    ("generation.vllm_kv_cache_gib=0", "generation.vllm_kv_cache_gib=0"),
    ("ppo.advantage_estimator=grpo",
     "ppo.advantage_estimator=grpo: needs ppo.samples_per_prompt >= 2"),
    ("ppo.advantage_estimator=ppo", "ppo.advantage_estimator='ppo'"),
    ("ppo.minibatch_size=48", "ppo.minibatch_size=48: must divide the responses per "
     "iteration (64 = ppo.rollout_batch_size x ppo.samples_per_prompt)"),
    ("ppo.loss_agg=mean", "ppo.loss_agg='mean'"),
    ("ppo.kl.placement=advantage", "ppo.kl.placement='advantage'"),
])
def test_bad_llm_config_messages_name_field_and_value(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("llm-tiny-smoke", [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_cli_bad_config_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "train", "hopper-smoke", "ppo.lr=-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ppo.lr=-1" in lines[0] and "greater than 0" in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_unknown_preset_and_presets_listing():
    proc = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "train", "walker"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown preset 'walker'" in proc.stderr
    out = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "presets"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "hopper-smoke" in out.stdout


def test_reward_model_autoscaling_reaches_serve_and_pages_are_per_run():
    from rlhf_ray.feedback.page import route_prefix
    from rlhf_ray.runtime.serving import deployment_options

    cfg = load_config("hopper-smoke")
    assert deployment_options(cfg.placement.reward_model)["num_replicas"] == 1
    cfg = load_config("hopper-smoke", ["placement.reward_model.autoscaling.max_replicas=4"])
    opts = deployment_options(cfg.placement.reward_model)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"]["min_replicas"] == 1
    assert opts["autoscaling_config"]["max_replicas"] == 4
    assert route_prefix(cfg, "hopper 2026/12") == "/label/hopper-2026-12"
    cfg = load_config("hopper-smoke", ["labeler.route_prefix=/team-a"])
    assert route_prefix(cfg, "anything") == "/team-a"


def test_the_sampler_dtype_is_the_learners_unless_set():
    from rlhf_ray.llm.workers import sampler_dtype

    assert sampler_dtype(load_config("smollm2-reviews")) == "float32"
    assert sampler_dtype(load_config("llm-tiny-smoke", ["model.dtype=bfloat16"])) == "bfloat16"
    assert sampler_dtype(load_config("smollm2-reviews", ["generation.dtype=bfloat16"])) == \
        "bfloat16"
    with pytest.raises(ConfigError, match="generation.dtype='fp8'"):
        load_config("llm-tiny-smoke", ["generation.dtype=fp8"])


def test_cli_error_an_actor_raised_is_its_own_one_line(monkeypatch, capsys):
    """A ValueError raised in an actor reaches the CLI wrapped in Ray's RayTaskError, whose
    first line names only the actor: the user sees the actor's message, unquoted."""
    from ray.exceptions import RayTaskError

    from rlhf_ray import cli, train

    def fails(*a, **k):
        raise RayTaskError("DPOTask.run", "traceback", ValueError("dpo: no preference pairs"),
                           ).as_instanceof_cause()

    monkeypatch.setattr(train, "train", fails)
    assert cli.main(["dpo", "llm-tiny-smoke", "--run-dir", "/tmp/unused"]) == 2
    assert capsys.readouterr().err.strip() == "rlhf-ray: dpo: no preference pairs"
