"""The LLM controller's two actor groups, each driven as if it were one local object (verl's
worker groups): the generation workers (prompts split over them, all calls in flight at
once, a restarted worker given the current policy before it is asked again) and the PPO
learner group (one torch.distributed group; every rank steps on its shard at once).

The role classes are `generation.HFGenerationWorker` / `vllm_generation.VLLMGenerationWorker`
and `learner.PPOLearner`; this module is their wiring.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from rlhf_ray.llm import data as lm_data
from rlhf_ray.llm.generation import HFGenerationWorker
from rlhf_ray.llm.learner import PPOLearner
from rlhf_ray.llm.modeling import PromptFormat, load_tokenizer
from rlhf_ray.llm.vllm_generation import VLLMGenerationWorker
from rlhf_ray.runtime.actors import remote_role

Bundle = Callable[[str, int], "int | None"]  # (role, i) -> a bundle of the run's plan
BACKENDS = {"hf": HFGenerationWorker, "vllm": VLLMGenerationWorker}


def generation_worker_class(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"generation.backend={backend!r}: use 'hf' or 'vllm'")
    return BACKENDS[backend]


def sampler_dtype(cfg) -> str:
    """The generation workers' dtype: `generation.dtype`, or the learner's (`model.dtype`)."""
    return cfg.model.dtype if cfg.generation.dtype == "model" else cfg.generation.dtype


def end_flags(ended: list[bool], fixed_length: bool) -> tuple[list[bool], list[bool]]:
    """(finished, truncated) of responses of which `ended` say which the policy ended with
    EOS: the rest the length limit cut (`truncated`, always). `finished` is what the reward
    model, the labeler and the missing-EOS penalty read: with `generation.fixed_length` the
    limit is where an answer ends, so every response counts as finished."""
    truncated = [not e for e in ended]
    return ([True] * len(ended) if fixed_length else list(ended)), truncated


class GenerationGroup:
    def __init__(self, cfg, policy_path: str, bundle: Bundle, pg=None,
                 adapter_path: str | None = None):
        place = cfg.placement
        cls = generation_worker_class(cfg.generation.backend)
        self.workers = [remote_role(cls, place.generation_worker, bundle("generation", i), pg=pg,
                                    max_restarts=-1).remote(
            policy_path, cfg.generation.model_dump(), max_prompt_tokens=cfg.data.max_prompt_tokens,
            seed=cfg.seed * 101 + i, torch_threads=cfg.run.torch_threads, dtype=sampler_dtype(cfg),
            prompt_format=PromptFormat.settings(cfg.data), lora=cfg.model.lora.model_dump(),
            adapter_path=adapter_path, train_top_layers=cfg.model.train_top_layers,
            device=place.devices()["generation"])
            for i in range(place.num_generation_workers)]
        self.restarts = 0  # worker restarts seen
        self._synced = None  # (version, weights ref) last pushed
        self.fixed_length = cfg.generation.fixed_length

    def generate(self, prompts: list[str], n: int = 1, seed: int | None = None) -> dict:
        """n samples of each prompt, merged in the workers' order; each part records the
        policy version that produced it (`versions`). `seed`: the sampling's (worker i's
        part: seed + i), so that two calls with one seed share their random draws."""
        return self.collect(self.submit(prompts, n, seed=seed))

    def submit(self, prompts: list[str], n: int = 1, logprobs: bool = False,
               seed: int | None = None) -> tuple:
        """Start generating (every worker at once); `collect` waits for the samples. The
        workers sample with the weights they hold when they get to it. `logprobs`: with the
        sampling policy's token log-probs (both backends give them)."""
        k = len(self.workers)
        parts = [prompts[i::k] for i in range(k)]
        seeds = [None if seed is None else seed + i for i in range(k)]
        refs = {i: w.generate.remote(parts[i], n, seed=seeds[i], logprobs=logprobs)
                for i, w in enumerate(self.workers) if parts[i]}
        return parts, n, refs, logprobs, seeds

    def collect(self, pending: tuple) -> dict:
        import ray

        parts, n, refs, logprobs, seeds = pending
        k = len(self.workers)
        done: dict[int, dict] = {}
        for attempt in range(5):
            if attempt:
                refs = {i: w.generate.remote(parts[i], n, seed=seeds[i], logprobs=logprobs)
                        for i, w in enumerate(self.workers) if parts[i] and i not in done}
            for i, ref in refs.items():
                try:
                    done[i] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    if attempt == 4:
                        raise
                    # Ray restarts it with the weights it started from
                    self.restarts += 1
                    self._resync(self.workers[i])
            if all(i in done for i in range(k) if parts[i]):
                break
        outs = [done[i] for i in sorted(done)]
        merged: dict = {"prompt_ids": [], "response_ids": [], "texts": [], "prompts": [],
                        "finished": []}
        for o in outs:
            for key in merged:
                merged[key] += o[key]
        if outs and all("logprobs" in o for o in outs):
            merged["logprobs"] = [x for o in outs for x in o["logprobs"]]
        merged["finished"], merged["truncated"] = end_flags(merged["finished"],
                                                            self.fixed_length)
        merged["versions"] = [o["version"] for o in outs]
        merged["tokens"] = sum(o["tokens"] for o in outs)
        merged["generate_s"] = max(o["generate_s"] for o in outs)
        merged["startup_s"] = max(o.get("startup_s", 0.0) for o in outs)
        return merged

    def push(self, version: int, weights_ref) -> None:
        """The learner's policy to every worker: an ObjectRef of the learner's own
        object-store copy (`LearnerGroup.policy_weights`), never through this process."""
        import ray

        self._synced = (version, weights_ref)  # what a restarted worker is given
        ray.get([w.update_weights.remote(*self._synced) for w in self.workers])

    def set_version(self, version: int) -> None:
        """The version of the weights the workers started from (a resumed run's policy)."""
        import ray

        ray.get([w.set_version.remote(version) for w in self.workers])

    def _resync(self, worker, patience_s: float = 120.0) -> None:
        import ray

        give_up = time.monotonic() + patience_s
        while self._synced is not None:
            try:
                ray.get(worker.update_weights.remote(*self._synced))
                return
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.5)


class LearnerGroup:
    def __init__(self, cfg, policy_path: str, critic_path: str, ref_path: str,
                 bundle: Bundle, pg=None, state_path: str | None = None,
                 adapter_path: str | None = None):
        """`ref_path`: the frozen reference (the SFT model); `state_path`: a checkpoint's
        optimizer.pt to continue from."""
        import ray

        place = cfg.placement
        tok = load_tokenizer(policy_path)
        pad = tok.pad_token_id

        def ids(split: str) -> list[list[int]] | None:
            texts = lm_data.pretrain_texts(cfg, split)
            if texts is None:
                return None
            rows = tok(texts, add_special_tokens=True, truncation=True,
                       max_length=cfg.data.pretrain_max_tokens)["input_ids"]
            return [r for r in rows if len(r) >= 2]

        # the alignment tax's held-out text, and PPO-ptx's mix (sent only where it is used)
        self.held_out_text = ids("eval")
        ptx = ids("train") if cfg.ppo.ptx_coef > 0 else None
        n = place.num_learners
        self.ranks = [remote_role(PPOLearner, place.learner, bundle("learner", r), pg=pg).remote(
            r, n, policy_path, critic_path, cfg.ppo.model_dump(),
            temperature=cfg.generation.temperature, seed=cfg.seed,
            torch_threads=cfg.run.torch_threads, dtype=cfg.model.dtype, pad_id=pad,
            ref_path=ref_path, state_path=state_path, lora=cfg.model.lora.model_dump(),
            adapter_path=adapter_path, gradient_checkpointing=cfg.model.gradient_checkpointing,
            train_top_layers=cfg.model.train_top_layers, device=place.devices()["learner"],
            iterations=cfg.run.iterations, max_new_tokens=cfg.generation.max_new_tokens,
            ptx_ids=ptx) for r in range(n)]
        addr, port = ray.get(self.ranks[0].address.remote())
        ray.get([lr.init_group.remote(addr, port, place.backend) for lr in self.ranks])

    def step(self, out: dict, scores: np.ndarray, beta: float) -> dict:
        """One PPO step of every rank on its shard of `out` (generated samples); rank 0's
        statistics, which are global (the ranks all-reduce them)."""
        import ray

        n = len(self.ranks)
        p_len = max(len(x) for x in out["prompt_ids"])
        r_len = max(len(y) for y in out["response_ids"])
        # the sampler's token log-probs, where generation gave them: PPO's old log-probs, or
        # compared with the learner's (ppo.old_logprobs)
        keys = {"prompt_ids": "prompt_ids", "response_ids": "response_ids",
                "logprobs": "sampler_logprobs"}
        return ray.get([lr.step.remote(
            {**{to: out[k][r::n] for k, to in keys.items() if k in out},
             "scores": scores[r::n], "prompt_len": p_len, "response_len": r_len}, beta)
            for r, lr in enumerate(self.ranks)])[0]

    def fold_reward_normalization(self, mean: float, std: float) -> None:
        import ray

        ray.get([r.fold_reward_normalization.remote(mean, std) for r in self.ranks])

    def policy_weights(self):
        """(version, ObjectRef of the state dict) of the policy (rank 0's: DDP keeps the
        ranks equal); the weights go from the learner's object store to the workers'."""
        import ray

        version, (ref,) = ray.get(self.ranks[0].put_policy_weights.remote())
        return version, ref

    def version(self) -> int:
        import ray

        return ray.get(self.ranks[0].get_version.remote())

    def text_perplexity(self) -> float | None:
        """The policy's perplexity of the held-out human-written text (`data.pretrain_path`'s
        last fifth, or the reviews task's eval snippets): the alignment tax, beside the SFT
        model's; None where the config has no such text."""
        import ray

        if not self.held_out_text:
            return None
        nll, n = ray.get(self.ranks[0].text_nll.remote(self.held_out_text))
        return float(np.exp(nll / max(n, 1)))

    def save(self, out_dir: str, tokenizer_path: str | None) -> None:
        import ray

        ray.get(self.ranks[0].save.remote(out_dir, tokenizer_path))
