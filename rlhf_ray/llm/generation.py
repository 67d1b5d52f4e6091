"""Generation workers: the LLM workload's rollout workers.

Backend `hf`: transformers `generate` with the KV cache, on CPU or GPU. Backend `vllm`
(`vllm_generation`): a vLLM engine in the worker's process, CPU or CUDA, weights pushed into the
running engine. Both answer the same two calls: `generate(prompts, n)` and
`update_weights(version, weights)`. Every sync carries a version number and every sample
records the version that produced it.
"""

from __future__ import annotations

import time

import torch

from rlhf_ray.llm.config import GenerationConfig
from rlhf_ray.llm.modeling import (
    PromptFormat,
    load_policy,
    load_tokenizer,
    lora_on,
    with_lora,
)
from rlhf_ray.runtime.devices import actor_device


def _cut_at_eos(ids: list[int], eos: int, pad: int) -> list[int]:
    out = []
    for t in ids:
        if t == pad and t != eos:
            break
        out.append(t)
        if t == eos:
            break
    return out


def response_logprobs_from_steps(step_logits, resp: list[list[int]],
                                 temperature: float) -> list[list[float]]:
    """log pi(y_t | x, y_<t) of each response's tokens, from the raw logits of the step that
    sampled position t (`generate`'s `output_logits`: one [N, V] per step). The tokens are
    the responses' own, so a response that stands as EOS (its first token sampled was the
    pad token) has the log-prob of EOS, the token the learner sees, not of the pad."""
    n, steps = len(resp), len(step_logits)
    toks = torch.zeros((n, steps), dtype=torch.long)
    for i, r in enumerate(resp):
        toks[i, :min(len(r), steps)] = torch.tensor(r[:steps])
    lp = torch.stack([torch.log_softmax(x.float() / temperature, -1).cpu()
                      .gather(1, toks[:, j:j + 1]).squeeze(1)
                      for j, x in enumerate(step_logits)], 1)
    return [lp[i, :len(r)].tolist() for i, r in enumerate(resp)]


class VersionedWorker:
    """What every generation backend shares: the policy version it holds."""

    def __init__(self, seed: int = 0):
        self.version = 0
        self.seed = seed
        self.calls = 0
        self.startup_s = 0.0

    def get_version(self) -> int:
        return self.version

    def set_version(self, version: int) -> int:
        """The version of the weights loaded at start (a resumed run's policy)."""
        self.version = int(version)
        return self.version

    def _samples(self, prompts: list[str], pids: list[list[int]], resp: list[list[int]],
                 n: int, t0: float, lps: list[list[float]] | None) -> dict:
        """What `generate` answers, whichever backend sampled `resp` (rows grouped by
        prompt, n each); `lps`: their log-probs, where asked for. Needs `self.tok`."""
        extra = {"logprobs": lps} if lps is not None else {}
        eos = self.tok.eos_token_id
        return {"prompt_ids": [x for x in pids for _ in range(n)], "response_ids": resp,
                # ended with EOS, or cut at generation.max_new_tokens (the reward model
                # must see the difference)
                "finished": [bool(r) and r[-1] == eos for r in resp],
                "texts": [self.tok.decode(r, skip_special_tokens=True) for r in resp],
                "prompts": [q for q in prompts for _ in range(n)], "version": self.version,
                "tokens": sum(len(r) for r in resp), "generate_s": time.time() - t0,
                "startup_s": self.startup_s, **extra}


class HFGenerationWorker(VersionedWorker):
    """transformers `generate` with sampling; prompts left padded, KV cache on."""

    def __init__(self, model_path: str, gen: dict, *, max_prompt_tokens: int = 64, seed: int = 0,
                 torch_threads: int = 1, dtype: str = "float32", device: str | None = None,
                 prompt_format: dict | None = None, lora: dict | None = None,
                 adapter_path: str | None = None, train_top_layers: int | None = None):
        """`prompt_format`: `PromptFormat.settings(cfg.data)` (chat template, instruction).
        `lora`: the policy trains LoRA adapters on this model (the SFT model): updates carry
        adapter weights, merged into the weights here (`adapter_path`: a checkpoint's)."""
        t0 = time.time()
        super().__init__(seed)
        torch.set_num_threads(torch_threads)
        self.gen = GenerationConfig.model_validate(gen)
        self.device = actor_device(device, "a generation worker")
        self.tok = load_tokenizer(model_path)
        self.model = load_policy(model_path, dtype, self.device).eval()
        self.lora = lora_on(lora)
        if self.lora:
            self.model = with_lora(self.model, lora, adapter_path, trainable=False,
                                   top=train_top_layers).eval()
            self.model.merge_adapter()
        self.fmt = PromptFormat.from_dict(self.tok, prompt_format, max_prompt_tokens)
        self.startup_s = time.time() - t0

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        return [self.fmt.encode(p) for p in prompts]

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int = 1, seed: int | None = None,
                 logprobs: bool = False) -> dict:
        """n samples per prompt (grouped: prompt i's samples at rows i*n .. i*n+n-1).
        Returns prompt_ids, response_ids (up to and including EOS), texts, version; with
        `logprobs`, also each response token's log pi(y_t | x, y_<t) under the sampling
        policy (log_softmax(logits / temperature), as the learner computes it): PPO's old
        log-probs without another forward pass, as TRL takes them from its generation."""
        t0 = time.time()
        self.calls += 1
        torch.manual_seed(self.seed * 1_000_003 + self.calls if seed is None else seed)
        pids = self.encode_prompts(prompts)
        # at most `generation.max_batch_size` sequences per call: the KV cache and the
        # per-step logits grow with them (256 SmolLM2 prompts at once peaked at 2.8 GB)
        step = max(1, (self.gen.max_batch_size or len(pids) * n) // n)
        resp: list[list[int]] = []
        lps: list[list[float]] = []
        for s in range(0, len(pids), step):
            r, lp = self._sample(pids[s:s + step], n, logprobs)
            resp += r
            lps += lp
        return self._samples(prompts, pids, resp, n, t0, lps if logprobs else None)

    def _sample(self, pids: list[list[int]], n: int,
                logprobs: bool) -> tuple[list[list[int]], list[list[float]]]:
        """One `generate` call: responses (cut after EOS) and, with `logprobs`, theirs."""
        p = max(len(x) for x in pids)
        pad = self.tok.pad_token_id
        ids = torch.full((len(pids), p), pad, dtype=torch.long)
        attn = torch.zeros((len(pids), p), dtype=torch.long)
        for i, x in enumerate(pids):
            ids[i, p - len(x):] = torch.tensor(x)
            attn[i, p - len(x):] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        out = self.model.generate(
            input_ids=ids, attention_mask=attn, do_sample=True,
            max_new_tokens=self.gen.max_new_tokens, temperature=self.gen.temperature,
            top_k=self.gen.top_k or None, top_p=self.gen.top_p, num_return_sequences=n,
            pad_token_id=pad, eos_token_id=self.tok.eos_token_id,
            return_dict_in_generate=logprobs, output_logits=logprobs)
        seqs = out.sequences if logprobs else out
        resp = [_cut_at_eos(row.tolist(), self.tok.eos_token_id, pad) for row in seqs[:, p:]]
        resp = [r if r else [self.tok.eos_token_id] for r in resp]
        if not logprobs:
            return resp, []
        return resp, response_logprobs_from_steps(out.logits, resp, self.gen.temperature)

    def update_weights(self, version: int, weights: dict[str, torch.Tensor]) -> int:
        """Load the learner's policy weights in place; stale versions are ignored."""
        if version <= self.version:
            return self.version
        if self.lora:  # adapter weights: out of the weights, replaced, merged back in
            from peft import set_peft_model_state_dict

            self.model.unmerge_adapter()
            res = set_peft_model_state_dict(self.model, weights)
            self.model.merge_adapter()
            if res.unexpected_keys:
                raise ValueError(f"adapter sync v{version}: unexpected {res.unexpected_keys[:3]}")
            self.version = version
            return self.version
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or [m for m in missing if "rotary" not in m]:
            raise ValueError(f"weight sync v{version}: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        self.version = version
        return self.version
