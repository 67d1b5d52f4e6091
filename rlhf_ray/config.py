"""One typed config tree per run.

Loaded from YAML (a packaged preset or a file), with dotted ``key=value`` overrides, validated
once. The same object is what the CLI, ``ray job submit`` entrypoints and Tune trials receive.
Errors name the field, the bad value and what is allowed; nothing is ever silently rewritten.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot run. ``str(err)`` is one line meant for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False, frozen=False)


class EnvConfig(_Strict):
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


class PPOConfig(_Strict):
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


class RewardModelConfig(_Strict):
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


class OracleConfig(_Strict):
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


class ClipConfig(_Strict):
    """How queried segments are rendered for humans (MuJoCo from saved state, Atari frames)."""

    width: int = Field(160, ge=16, le=1920)
    height: int = Field(120, ge=16, le=1080)
    fps: int = Field(25, ge=1, le=120, description="playback frames per second")
    frame_skip: int = Field(2, ge=1, description="render every n-th step of a segment")
    shadows: bool = Field(False, description="MuJoCo shadows and reflections (5x slower on CPU)")


class LabelerSection(_Strict):
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


class LabelerConfig(LabelerSection):
    """The control workload's labeler: a synthetic teacher on true env returns, and clips."""

    oracle: OracleConfig = Field(default_factory=OracleConfig)
    text_oracle: str | None = Field(
        None, description="`module:function` scoring (prompt, response) for text queries")
    clip_renderers: int = Field(1, ge=0, description="render actors keeping clips ahead")
    clips: ClipConfig = Field(default_factory=ClipConfig)


class LabelsConfig(_Strict):
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


class RoleResources(_Strict):
    num_cpus: float = Field(0.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources")


class AutoscalingSettings(_Strict):
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


class PlacementSection(_Strict):
    """Which role gets which resources: the one place placement is declared. The roles both
    workloads have; each workload's own roles are in its subclass."""

    reward_model: RewardServeConfig = Field(default_factory=lambda: RewardServeConfig(num_cpus=0.25))
    reward_trainer: RoleResources = Field(default_factory=lambda: RoleResources(num_cpus=0.25))
    labeler: RoleResources = Field(default_factory=RoleResources)
    labeling_app: RoleResources = Field(default_factory=RoleResources)


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


class RunSection(_Strict):
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


class RunConfig(RunSection):
    total_env_steps: int = Field(1_000_000, ge=1)
    reward: Literal["learned", "env"] = Field(
        "learned", description="`env` trains PPO on the true reward: the baseline"
    )
    final_eval_episodes: int = Field(
        10, ge=0, description="after training, the final policy's true return on this many "
        "fresh episodes, actions at the policy's mean (RUN/final_eval.json); 0: none")


class Config(_Strict):
    name: str = "custom"
    description: str = ""
    workload: Literal["control"] = Field(
        "control", description="control (this tree) or llm (see LLMConfig)")
    seed: int = 0
    env: EnvConfig
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    labeler: LabelerConfig = Field(default_factory=LabelerConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> "Config":
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
            from rlhf_ray.control.envs import ATARI_SCORE_AREAS, atari_game

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
        from rlhf_ray.control.envs import atari_score_area

        return atari_score_area(self.env.id)


# --------------------------------------------------------------------------- LLM workload


class TinyModelConfig(_Strict):
    """The locally built Llama-architecture model (`model.policy: tiny`)."""

    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=8)


class LoRAConfig(_Strict):
    """Low-rank adapters through `peft` (Hu et al. 2021) on the policy and the critic; the
    reference is then the policy with its adapters off, not a second copy."""

    r: int = Field(0, ge=0, description="adapter rank; 0: full fine-tuning")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                 "up_proj", "down_proj"])


class LMModelConfig(_Strict):
    policy: str = Field(
        "tiny", description="Hugging Face causal LM name or local path the SFT stage starts "
        "from; `tiny` builds a small Llama and a word-level tokenizer here (no hub needed)")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    sft_path: str | None = Field(
        None, description="an SFT model folder: `rm`/`ppo`/`train` start from it and skip SFT")
    reward_path: str | None = Field(
        None, description="a reward-model folder: `ppo`/`train` use it and skip the initial fit")
    critic_init: Literal["reward_model", "policy"] = Field(
        "reward_model", description="the critic's starting weights (InstructGPT: the RM)")
    dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="auto: bfloat16 where the device supports it, else float32")
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the learners' backward (less memory)")
    train_top_layers: int | None = Field(
        None, ge=1, description="train only the top N transformer blocks (and the heads) of "
        "every model (SFT, reward model, policy, critic; LoRA goes on those blocks): the "
        "backward pass stops below them. null: all")


class ReviewsSplit(_Strict):
    """Snippets per disjoint part (by id); `sft` takes the rest."""

    yardstick: int = Field(3000, ge=10)
    oracle: int = Field(1500, ge=10)
    reward_model: int = Field(3000, ge=10)
    eval: int = Field(300, ge=1)
    ppo: int = Field(1000, ge=1)


class ReviewsConfig(_Strict):
    """The `reviews` task (see rlhf_ray.llm.reviews)."""

    ratings_path: str = Field(
        "rt-ratings", description="an asset name, a folder with snippets.tsv (id, sentiment, "
        "text) and raters.tsv, or a snippets file alone")
    split_seed: int = Field(0, description="the split by snippet id; the same for every run seed")
    split: ReviewsSplit = Field(default_factory=ReviewsSplit)
    prompt_words: int = Field(4, ge=1, description="words of a snippet that make its prompt")
    min_margin: float = Field(1.5, gt=0, description="mean-rating gap of a kept comparison")
    num_pairs: int = Field(2000, ge=1, description="comparisons for the reward model")
    soft_labels: bool = Field(
        True, description="label each pair with the raters' preference probability, not 1")


class LMDataConfig(_Strict):
    task: Literal["sentiment", "reviews"] | None = Field(
        "sentiment", description="sentiment: generated (rlhf_ray.llm.tiny); reviews: real "
        "human ratings (rlhf_ray.llm.reviews); null: use the paths")
    reviews: ReviewsConfig = Field(default_factory=ReviewsConfig)
    instruction: str = Field(
        "", description="what the policy is asked to do: the chat template's user message, "
        "and the task text the labeling page shows")
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="wrap prompts in the tokenizer's chat template (auto: where it "
        "has one); the prompt text then starts the assistant's turn")
    num_prompts: int = Field(512, ge=1, description="generated prompts (task only)")
    num_sft_examples: int = Field(2048, ge=1, description="demonstrations of a task (generated, "
                                  "or the first of the reviews task's sft split)")
    prompts_path: str | None = Field(None, description="Parquet/JSONL with a `prompt` column")
    sft_path: str | None = Field(None, description="Parquet/JSONL: `prompt`, `response`")
    preferences_path: str | None = Field(
        None, description="Parquet/JSONL: `prompt`, `chosen`, `rejected` (as hh-rlhf), or "
        "`prompt`, `responses` (K, best first) for rankings")
    max_prompt_tokens: int = Field(64, ge=1)


class GenerationConfig(_Strict):
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers generate (CPU or GPU); vllm: a vLLM engine (GPU)")
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0: no top-k filtering")
    top_p: float = Field(1.0, gt=0, le=1)
    max_batch_size: int | None = Field(
        64, ge=1, description="hf backend: sequences (prompts x samples) per generate call; "
        "bounds the KV cache and per-step logits (null: all at once). vLLM batches itself")
    vllm_gpu_memory_utilization: float = Field(0.5, gt=0, le=1)


class SFTConfig(_Strict):
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)


class LMRewardConfig(_Strict):
    """An LM backbone with a scalar head, trained on rankings with InstructGPT's loss."""

    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(16, ge=1, description="rankings (prompts) per gradient step")
    initial_epochs: int = Field(8, ge=1, description="passes over the initial labels")
    steps_per_round: int = Field(20, ge=0, description="gradient steps per online round")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="rankings held out for accuracy")
    val_max: int = Field(64, ge=1, description="held-out rankings scored after each round "
                         "(the first ones held out: a fixed set)")


class KLConfig(_Strict):
    estimator: Literal["k1", "k3"] = Field("k1", description="per-token KL in the reward")
    controller: Literal["fixed", "adaptive"] = "adaptive"
    init_coef: float = Field(0.1, ge=0, description="beta at the start")
    target: float = Field(2.0, gt=0, description="adaptive: KL per response (nats) to hold")
    horizon: int = Field(10_000, ge=1, description="adaptive: Ziegler et al.'s K_beta horizon")
    min_coef: float = Field(0.0, ge=0, description="adaptive: beta never falls below this "
                            "(stops the windup while the policy has not reached the target yet)")


class LMPPOConfig(_Strict):
    rollout_batch_size: int = Field(64, ge=1, description="prompts (responses) per iteration")
    minibatch_size: int = Field(16, ge=1, description="responses per optimizer step")
    micro_batch_size: int = Field(8, ge=1, description="responses per forward (grad accumulation)")
    micro_batch_tokens: int | None = Field(
        None, ge=1, description="size micro batches by tokens instead (verl's dynamic batch "
        "size): rows longest first, each micro batch at most this many tokens padded to its own "
        "longest prompt + response; memory follows tokens. null: micro_batch_size rows")
    ppo_epochs: int = Field(4, ge=1)
    lr: float = Field(3e-4, gt=0)
    critic_lr: float = Field(1e-3, gt=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float | None = Field(0.2, gt=0)
    whiten_advantages: bool = True
    normalize_reward: bool = Field(
        True, description="standardize RM scores by their mean and std on SFT samples, "
        "measured once before PPO starts")
    reward_clip: float | None = Field(5.0, gt=0, description="clip normalized scores to +-this")
    entropy_coef: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    kl: KLConfig = Field(default_factory=KLConfig)
    old_logprobs: Literal["generation", "learner"] = Field(
        "generation", description="PPO's old log-probs: generation: the sampler's own, from "
        "the logits it sampled with (TRL's way; one forward pass fewer; the hf backend: vLLM's "
        "kernels differ, so there the learner recomputes them); learner: a forward pass of the "
        "learner (verl's and OpenRLHF's way)")
    cache_frozen_blocks: bool = Field(
        True, description="with model.train_top_layers: run the frozen blocks below the "
        "trained ones once per iteration (in the experience pass) and feed their output to the "
        "top blocks in every PPO epoch, instead of recomputing it in each (checked against the "
        "full forward once per learner; off by itself where a model family differs)")
    async_generation: bool = Field(
        False, description="generate the next batch while the learner steps on this one: "
        "one step off-policy (verl's and OpenRLHF's async modes); the lag is `policy_lag`")


class LMEvalConfig(_Strict):
    """The yardstick: an independent judge of the policy, never its training signal."""

    yardstick: str | None = Field(
        None, description="`module:function` (see rlhf_ray.llm.yardstick); null: the "
        "labeler's oracle")
    every: int = Field(5, ge=0, description="iterations between held-out evaluations; 0: "
                       "only before and after PPO")
    num_prompts: int = Field(64, ge=1, description="held-out prompts per evaluation")


class LMLabelsConfig(_Strict):
    initial: int = Field(128, ge=1, description="rankings of SFT samples before PPO starts")
    per_iteration: int = Field(4, ge=0, description="rankings of policy samples each iteration")
    budget: int = Field(512, ge=1, description="total rankings over the run")
    responses_per_query: int = Field(4, ge=2, le=9, description="K: 2 = pairs, >2 = rankings")


class LMLabelerConfig(LabelerSection):
    """The LLM workload's labeler: people rank responses, or a text oracle does."""

    oracle: str = Field(
        "rlhf_ray.llm.tiny:sentiment_oracle",
        description="`module:function` scoring (prompt, response) -> float")
    instruction: str = Field(
        "Rank the responses from best to worst.",
        description="what the labeling page asks people to judge")


class LMPlacementConfig(PlacementSection):
    """The LLM workload: generation workers and the DDP learner group."""

    num_generation_workers: int = Field(1, ge=1)
    generation_worker: RoleResources = Field(default_factory=lambda: RoleResources(num_cpus=0.5))
    num_learners: int = Field(1, ge=1, description="torch.distributed ranks (DDP)")
    learner: RoleResources = Field(default_factory=lambda: RoleResources(num_cpus=0.5))
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto: nccl on GPU, gloo on CPU")
    group_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] | None = Field(
        None, description="one placement group for generation workers, learner ranks and the "
        "reward trainer, each actor in its own bundle; STRICT_PACK keeps them on one node")
    group_timeout_s: float = Field(120.0, gt=0, description="how long to wait for the group")


class LMRunConfig(RunSection):
    iterations: int = Field(30, ge=1, description="PPO iterations")


class LLMConfig(_Strict):
    """InstructGPT's three steps: SFT -> reward model from rankings -> PPO with a KL penalty."""

    name: str = "custom"
    description: str = ""
    workload: Literal["llm"] = "llm"
    seed: int = 0
    model: LMModelConfig = Field(default_factory=LMModelConfig)
    data: LMDataConfig = Field(default_factory=LMDataConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    reward_model: LMRewardConfig = Field(default_factory=LMRewardConfig)
    ppo: LMPPOConfig = Field(default_factory=LMPPOConfig)
    labels: LMLabelsConfig = Field(default_factory=LMLabelsConfig)
    labeler: LMLabelerConfig = Field(default_factory=LMLabelerConfig)
    eval: LMEvalConfig = Field(default_factory=LMEvalConfig)
    placement: LMPlacementConfig = Field(default_factory=LMPlacementConfig)
    run: LMRunConfig = Field(default_factory=LMRunConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> "LLMConfig":
        p, n = self.ppo, self.placement.num_learners
        if p.rollout_batch_size % p.minibatch_size:
            raise ValueError(f"ppo.minibatch_size={p.minibatch_size}: must divide "
                             f"ppo.rollout_batch_size={p.rollout_batch_size}")
        if p.minibatch_size % n:
            raise ValueError(f"ppo.minibatch_size={p.minibatch_size}: must split evenly over "
                             f"placement.num_learners={n}")
        if (p.minibatch_size // n) % p.micro_batch_size:
            raise ValueError(f"ppo.micro_batch_size={p.micro_batch_size}: must divide the "
                             f"per-learner minibatch ({p.minibatch_size // n} = "
                             f"ppo.minibatch_size / placement.num_learners)")
        if self.data.task is None and self.data.prompts_path is None:
            raise ValueError("data.prompts_path: required when data.task is null")
        if self.labels.initial > self.labels.budget:
            raise ValueError(f"labels.initial={self.labels.initial}: exceeds "
                             f"labels.budget={self.labels.budget}")
        return self


# --------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("rlhf_ray.presets").iterdir()
                  if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    return resources.files("rlhf_ray.presets").joinpath(f"{name}.yaml").read_text()


def _read_source(preset_or_path: str) -> dict[str, Any]:
    if preset_or_path.startswith("file://"):
        preset_or_path = preset_or_path[len("file://"):]
    path = Path(preset_or_path)
    if "://" in preset_or_path:  # a run folder's config.yaml on object storage
        from rlhf_ray import storage

        try:
            text = storage.read_text(preset_or_path)
        except FileNotFoundError:
            raise ConfigError(f"config file {preset_or_path!r} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"{preset_or_path}: cannot read ({str(exc).splitlines()[0]})") from None
    elif preset_or_path.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {preset_or_path!r} does not exist")
        text = path.read_text()
    elif preset_or_path in preset_names():
        text = preset_text(preset_or_path)
    else:
        raise ConfigError(
            f"unknown preset {preset_or_path!r}: choose one of {', '.join(preset_names())} "
            "or give a path to a YAML file"
        )
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{preset_or_path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{preset_or_path}: the top level must be a mapping")
    base = data.pop("base", None)
    if base is not None:
        data = deep_merge(_read_source(str(base)), data)
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars/flow collections."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. labels.budget=350")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part!r} is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def _format_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key (check the spelling; `rlhf-ray presets --show NAME` lists keys)"
    if err["type"] == "value_error":
        return msg.removeprefix("Value error, ")
    return f"{loc}={err.get('input')!r}: {msg}"


def validate(data: dict[str, Any]) -> Config | LLMConfig:
    """The control workload's `Config`, or `LLMConfig` where `workload: llm`."""
    try:
        if data.get("workload") == "llm":
            return LLMConfig.model_validate(data)
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    _check_env_exists(cfg.env.id)
    return cfg


def _check_env_exists(env_id: str) -> None:
    import gymnasium as gym

    if env_id.startswith("ALE/"):
        import ale_py

        gym.register_envs(ale_py)
    try:
        gym.spec(env_id)
    except Exception:  # gymnasium raises several error types for unknown ids
        raise ConfigError(
            f"env.id={env_id!r}: not a registered gymnasium env (e.g. Hopper-v5, ALE/Pong-v5)"
        ) from None


def load_config(preset_or_path: str, overrides: list[str] | None = None) -> Config | LLMConfig:
    data = apply_overrides(_read_source(preset_or_path), list(overrides or []))
    return validate(data)


def dump_config(cfg: Config | LLMConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
