"""The control workload's config: deep RL from human preferences (Christiano et al. 2017)
on gymnasium envs (MuJoCo, Atari) with RLlib PPO. One typed tree, validated once; errors name
the field, the bad value and what is allowed."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf_ray.control.envs import ATARI_SCORE_AREAS, atari_game, atari_score_area
from rlhf_ray.runtime.placement import Placement, bundle_of
from rlhf_ray.runtime.sections import (
    LabelerSection,
    PlacementSection,
    RoleResources,
    RunSection,
    Strict,
)


class EnvConfig(Strict):
    id: str = Field(description="gymnasium env id, e.g. Hopper-v5 or ALE/Pong-v5")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to gymnasium.make")
    preprocessing: Literal["none", "atari"] = "none"
    remove_termination: bool = Field(
        False,
        description="ignore `terminated` (the paper's fixed-length episodes); the episode then "
        "ends only at the time limit, so termination cannot leak reward information",
    )
    max_episode_steps: int | None = Field(None, ge=1)
    num_envs_per_env_runner: int = Field(1, ge=1)
    episodic_life: bool = Field(
        False, description="Atari: end an episode at each lost life (RLlib's and DQN's "
        "preprocessing). Off as in the paper, whose agents were not told about lost lives")


class PPOConfig(Strict):
    """RLlib PPO settings (names as RLlib and the PPO paper use them)."""

    train_batch_size: int = Field(4096, ge=1)
    minibatch_size: int = Field(128, ge=1)
    num_epochs: int = Field(10, ge=1)
    lr: float = Field(3e-4, gt=0)
    gamma: float = Field(0.99, gt=0, le=1)
    lambda_: float = Field(0.95, ge=0, le=1)
    clip_param: float = Field(0.2, gt=0)
    vf_clip_param: float = Field(10.0, gt=0)
    vf_loss_coeff: float = Field(0.5, ge=0)
    entropy_coeff: float = Field(0.0, ge=0)
    use_kl_loss: bool = False
    kl_coeff: float = Field(0.2, ge=0)
    kl_target: float = Field(0.01, gt=0)
    grad_clip: float | None = Field(0.5, gt=0)
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    activation: Literal["tanh", "relu"] = "tanh"
    obs_filter: Literal["MeanStdFilter", "none"] = "MeanStdFilter"
    vf_share_layers: bool = False
    log_std_init: float | None = Field(
        -1.0, description="continuous actions: the Gaussian policy's initial log std, its "
        "action noise (-1: std 0.37 of a [-1, 1] action). RLlib's own start (null) is about "
        "0, std 1, and after 300k Walker2d steps its noise was still 0.70-0.97: the final "
        "policy's mean actions were a controller training never ran, and fell in some "
        "episodes where its samples walked")


class RewardModelConfig(Strict):
    """The reward-predictor ensemble of Christiano et al. 2017, section 2.2.3."""

    net: Literal["auto", "mlp", "cnn"] = "auto"
    ensemble_size: int = Field(3, ge=1)
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    lr: float = Field(3e-4, gt=0)
    batch_size: int = Field(32, ge=1, description="comparisons per gradient step")
    steps_per_round: int = Field(200, ge=1, description="gradient steps per member per round")
    pretrain_steps: int = Field(1000, ge=0, description="steps before RL starts")
    round_label_growth: float = Field(
        0.1, ge=0, description="start a training round once the labels grew by this fraction "
        "since the last round began (0: whenever any label arrived)")
    l2: float = Field(1e-3, ge=0, description="initial L2 coefficient")
    adapt_l2: bool = True
    val_loss_ratio: tuple[float, float] = Field(
        (1.1, 1.5), description="keep validation loss within this multiple of training loss"
    )
    random_response_prob: float = Field(
        0.1, ge=0, le=1, description="the paper's 10% chance of a uniformly random label"
    )
    output_std: float = Field(1.0, gt=0, description="1 for MuJoCo, 0.05 for Atari")
    score_area: Literal["auto"] | list[tuple[int, int, int, int]] = Field(
        "auto", description="CNN: [row0, row1, col0, col1) boxes of the 84x84 frames that the "
        "reward model sees blank (the paper blanked the score: it must not read the reward "
        "off the screen); auto: the game's known score area; []: nothing blanked")
    dropout: float = Field(0.0, ge=0, lt=1, description="after each hidden layer (the "
                           "paper's Atari predictor: 0.5 on every conv layer)")
    batch_norm: bool = Field(False, description="CNN: batch norm after each conv layer (the "
                             "paper's Atari predictor)")
    label_buffer: int | None = Field(
        None, ge=1, description="train and validate on the most recent N labels only (the "
        "paper's Atari runs kept 3,000); the store keeps every label. null: all of them")
    normalize_inputs: bool = Field(
        True, description="standardize the MLP's (obs, action) inputs by the labelled "
        "transitions' mean and std, refitted each round without changing the function")


class OracleConfig(Strict):
    """Synthetic teacher (B-Pref, Lee et al. 2021). Defaults: the perfectly rational oracle."""

    beta: float | None = Field(
        None, gt=0, description="Bradley-Terry rationality; null = deterministic (perfectly rational)"
    )
    gamma: float = Field(1.0, gt=0, le=1, description="myopic discount of earlier steps")
    mistake_prob: float = Field(0.0, ge=0, le=1)
    skip_threshold: float | None = Field(
        None, description="answer `skip` when both segments' returns are below this"
    )
    equal_threshold: float = Field(0.0, ge=0, description="answer `equal` within this margin")


class ClipConfig(Strict):
    """How queried segments are rendered for humans (MuJoCo from saved state, Atari frames)."""

    width: int = Field(160, ge=16, le=1920)
    height: int = Field(120, ge=16, le=1080)
    fps: int = Field(25, ge=1, le=120, description="playback frames per second")
    frame_skip: int = Field(2, ge=1, description="render every n-th step of a segment")
    shadows: bool = Field(False, description="MuJoCo shadows and reflections (5x slower on CPU)")


class LabelerConfig(LabelerSection):
    """The control workload's labeler: a synthetic teacher on true env returns, and clips."""

    oracle: OracleConfig = Field(default_factory=OracleConfig)
    text_oracle: str | None = Field(
        None, description="`module:function` scoring (prompt, response) for text queries")
    clip_renderers: int = Field(1, ge=0, description="render actors keeping clips ahead")
    clips: ClipConfig = Field(default_factory=ClipConfig)


class LabelsConfig(Strict):
    budget: int = Field(700, ge=1, description="total labels over the run")
    initial_fraction: float = Field(0.25, ge=0, le=1, description="labels from the initial policy")
    t0_steps: int = Field(200_000, ge=1, description="label rate is proportional to T0/(T+T0)")
    query_selection: Literal["variance", "uniform"] = "variance"
    oversampling: int = Field(10, ge=1, description="candidate pairs per query")
    segment_length: int | None = Field(
        None, ge=2, description="steps per segment; default round(segment_seconds / env dt)"
    )
    segment_seconds: float = Field(1.5, gt=0)
    pool_size: int = Field(
        320, ge=2, description="recent segments kept as query candidates (about the last 5 "
        "iterations by default: queries must come from the current policy)")
    segments_per_sample: int = Field(64, ge=1, description="segments each rollout batch offers")


class PlacementConfig(PlacementSection):
    """The control workload: rollout workers (RLlib EnvRunners), learners, clip renderers."""

    num_env_runners: int = Field(1, ge=0)
    env_runner: RoleResources = Field(default_factory=lambda: RoleResources(num_cpus=1))
    num_learners: int = Field(0, ge=0, description="0: the learner runs in the controller")
    learner: RoleResources = Field(default_factory=lambda: RoleResources(num_cpus=1))
    learner_threads: int | None = Field(
        None, ge=1, description="torch threads of a learner in the controller "
        "(num_learners=0); default learner.num_cpus. PPO samples and learns in turn, so "
        "while it learns the rollout workers' cores sit idle and a conv policy can use them "
        "(the pong preset: 2); a small MLP runs fastest on one")
    batch_nice: int = Field(
        10, ge=0, le=19, description="CPU niceness added to the batch roles so the critical "
        "path answers first where roles share cores: the reward trainer always (it fills the "
        "gaps between rollouts and PPO updates); rollout workers, clip renderers and a learner "
        "in the driver only while people label (the page must answer promptly); 0 leaves "
        "priorities alone")
    clip_renderer: RoleResources = Field(default_factory=lambda: RoleResources(num_cpus=0.25))
    env_runner_probe_timeout_s: float = Field(
        5.0, gt=0, description="how long an iteration waits for a restarting rollout worker")

    def roles(self) -> Placement:
        """Rollout workers and learners (RLlib places the ones that ask for nothing
        itself), and the reward trainer; the driver's bundle holds the learner where it runs
        in the driver."""
        actors = ([("env_runner", self.env_runner)] * self.num_env_runners
                  + [("learner", self.learner)] * self.num_learners
                  + [("reward_trainer", self.reward_trainer)])
        driver = bundle_of(self.learner, 0.25) if self.num_learners == 0 else {"CPU": 0.25}
        return Placement(driver, actors, pin_empty=False)


class RunConfig(RunSection):
    total_env_steps: int = Field(1_000_000, ge=1)
    reward: Literal["learned", "env", "env_standardized"] = Field(
        "learned", description="`env` trains PPO on the true reward: the baseline; "
        "`env_standardized` on the true reward standardized as the reward model's output is "
        "(zero mean and std reward_model.output_std over each train batch): the baseline "
        "that tells a gain from the learned reward apart from one of its normalization"
    )
    final_eval_episodes: int = Field(
        10, ge=0, description="after training, the final policy's true return on this many "
        "fresh episodes, actions at the policy's mean (RUN/final_eval.json); 0: none")
    final_eval_sampled: bool = Field(
        True, description="the final evaluation also runs as many episodes with actions "
        "sampled as in training (`sampled` in final_eval.json): where the two differ, the "
        "mean action is not what the policy was trained to do")


class ControlConfig(Strict):
    name: str = "custom"
    description: str = ""
    workload: Literal["control"] = Field(
        "control", description="which workload this config runs (this tree: control)")
    seed: int = 0
    env: EnvConfig
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    labeler: LabelerConfig = Field(default_factory=LabelerConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> "ControlConfig":
        p = self.ppo
        if p.minibatch_size > p.train_batch_size or p.train_batch_size % p.minibatch_size:
            raise ValueError(
                f"ppo.minibatch_size={p.minibatch_size}: must divide "
                f"ppo.train_batch_size={p.train_batch_size}"
            )
        lo, hi = self.reward_model.val_loss_ratio
        if not 1.0 <= lo < hi:
            raise ValueError(
                f"reward_model.val_loss_ratio={[lo, hi]}: need 1 <= low < high"
            )
        if self.labels.initial_fraction * self.labels.budget < 1 and self.run.reward == "learned":
            raise ValueError(
                f"labels.initial_fraction={self.labels.initial_fraction}: gives no initial labels "
                f"with labels.budget={self.labels.budget}; the reward model needs some to start"
            )
        if self.reward_net() == "cnn" and self.reward_model.score_area == "auto" \
                and self.run.reward == "learned":
            if atari_game(self.env.id) not in ATARI_SCORE_AREAS:
                raise ValueError(
                    f"reward_model.score_area=auto: no known score area for env.id="
                    f"{self.env.id!r} (known: {sorted(ATARI_SCORE_AREAS)}); give the boxes "
                    "[[row0, row1, col0, col1], ...] of the 84x84 frames, or [] to let the "
                    "reward model see the score")
        for box in ([] if self.reward_model.score_area == "auto" else self.reward_model.score_area):
            r0, r1, c0, c1 = box
            if not (0 <= r0 < r1 <= 84 and 0 <= c0 < c1 <= 84):
                raise ValueError(f"reward_model.score_area box {list(box)}: need 0 <= row0 < "
                                 "row1 <= 84 and 0 <= col0 < col1 <= 84")
        pl = self.placement
        if pl.num_learners == 0 and (pl.learner.resources or pl.learner.num_gpus):
            raise ValueError(
                f"placement.learner={pl.learner.model_dump()}: with placement.num_learners=0 "
                "the learner runs inside the controller and cannot be placed; set "
                "placement.num_learners=1 (or more)"
            )
        return self

    def reward_net(self) -> str:
        if self.reward_model.net != "auto":
            return self.reward_model.net
        return "cnn" if self.env.preprocessing == "atari" else "mlp"

    def score_area(self) -> list[tuple[int, int, int, int]]:
        """The boxes the CNN reward model sees blank (none for the MLP)."""
        if self.reward_net() != "cnn":
            return []
        area = self.reward_model.score_area
        if area != "auto":
            return [tuple(b) for b in area]
        return atari_score_area(self.env.id)


