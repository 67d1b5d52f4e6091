"""The LLM workload as the shared layer sees it (`rlhf_ray.runtime.workload`): its config,
controller, roles and their resources, query kind (text rankings), stages, metrics, report
and the packaged models and data it names."""

from __future__ import annotations

from rlhf_ray.llm import assets, labeling, report
from rlhf_ray.llm.config import LLMConfig
from rlhf_ray.llm.metrics import LLM
from rlhf_ray.runtime.workload import SharedStages, Workload


def shared_stages(cfg: LLMConfig) -> SharedStages | None:
    """SFT and the first reward model, once for every trial of a sweep (unless given)."""
    if cfg.model.sft_path and cfg.model.reward_path:
        return None
    return SharedStages("rm", {"model.sft_path": "sft", "model.reward_path": "reward_model"},
                        done="reward_model/model.safetensors")


def packaged_assets(cfg: LLMConfig) -> list[str]:
    """The assets a config names (its model, its data, its yardstick's encoder)."""
    refs = [cfg.model.policy, cfg.model.sft_path, cfg.model.reward_path]
    if cfg.data.task == "reviews":
        refs.append(cfg.data.reviews.ratings_path)
    if "minilm" in (cfg.eval.yardstick or ""):
        refs.append("minilm-l6")
    return [r for r in refs if r in assets.ASSETS]


WORKLOAD = Workload(
    name="llm",
    config=LLMConfig,
    controller_path="rlhf_ray.llm.loop:LLMController",
    describe=lambda cfg: f"llm:{cfg.model.policy}",
    placement=lambda cfg: cfg.placement.roles(),
    query_kind=labeling.query_kind,
    metrics=LLM,
    report=report.report,
    default_metric="oracle_score_mean",
    max_iterations=lambda cfg: cfg.run.iterations,
    trial_settings=lambda cfg: {"kl": cfg.ppo.kl.model_dump(mode="json")},
    stages=("sft", "rm", "ppo", "dpo"),
    shared_stages=shared_stages,
    assets=packaged_assets,
)
