"""The config sections every workload has: where a run lives and how it runs, which role
gets which resources, and who answers queries. Each workload's `config.py` adds its own
sections and fields to these (`control.config`, `llm.config`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False, frozen=False)


class LabelerSection(Strict):
    """Who answers queries, and the labeling page humans use (both workloads)."""

    source: Literal["oracle", "human", "mixed"] = Field(
        "oracle", description="oracle: synthetic labels; human: the labeling page; mixed: "
        "humans, with the oracle answering what they leave past `deadline_s`")
    host: str = Field("127.0.0.1", description="where the page listens; 0.0.0.0 exposes it")
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str | None = Field(
        None, pattern=r"^/[A-Za-z0-9_/.-]*$",
        description="where the page lives under the host; default /label/<run name>, so "
        "several runs on one cluster each have their own page")
    token: str | None = Field(None, min_length=16, description="access token; default: random")
    lease_s: float = Field(60.0, gt=0, description="a shown query is held this long per labeler")
    deadline_s: float = Field(120.0, gt=0, description="mixed: oracle answers after this")
    instruction: str = Field("", description="what the labeling page asks people to judge "
                             "(empty: the page's own question)")


class RoleResources(Strict):
    num_cpus: float = Field(0.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources")


class AutoscalingSettings(Strict):
    """Serve's autoscaling of the reward model's replicas (`autoscaling_config`): replicas are
    added while each holds more than `target_ongoing_requests` and removed when idle."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas "
                             f"{self.max_replicas}")
        return self


class RewardServeConfig(RoleResources):
    num_replicas: int = Field(1, ge=1, description="fixed replicas (unless `autoscaling`)")
    autoscaling: AutoscalingSettings | None = Field(
        None, description="Serve autoscaling between min and max replicas instead of "
        "`num_replicas`; every relabelling call is pinned to one version across replicas")
    max_batch_size: int = Field(16, ge=1, description="requests merged into one forward pass")
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(256, ge=-1)


class PlacementSection(Strict):
    """Which role gets which resources: the one place placement is declared. The roles both
    workloads have; each workload's own roles are in its subclass."""

    reward_model: RewardServeConfig = Field(default_factory=lambda: RewardServeConfig(num_cpus=0.25))
    reward_trainer: RoleResources = Field(default_factory=lambda: RoleResources(num_cpus=0.25))
    labeler: RoleResources = Field(default_factory=RoleResources)
    labeling_app: RoleResources = Field(default_factory=RoleResources)


class RunSection(Strict):
    """Where a run lives and how it runs (both workloads)."""

    storage_path: str = Field("runs", description="local folder or s3:// / gs:// URI")
    run_name: str | None = None
    checkpoint_every: int = Field(10, ge=0, description="iterations; 0 = only at the end")
    torch_threads: int = Field(1, ge=1)
    ray_num_cpus: int | None = Field(None, ge=1, description="size of a local cluster we start")
    stage_threads: int | None = Field(
        None, ge=1, description="torch threads of a stage that runs alone: the reward "
        "model's first fit (the control pretraining, the LLM's first fit) and SFT; null: the "
        "CPUs of the node it runs on")


