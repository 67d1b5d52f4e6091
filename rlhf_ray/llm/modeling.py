"""Models, batches and log-probabilities for the LLM workload.

Models are ordinary Hugging Face models: the policy and the frozen reference are
`AutoModelForCausalLM`; the reward model and the critic are `AutoModelForSequenceClassification`
with one label (an LM backbone with a scalar head, as TRL and OpenRLHF save them). The reward
model reads its head at the last real token; the critic reads it at every position.

A batch is (prompt, response) token ids laid out as [B, P + T]: prompts left padded to P,
responses right padded to T. `position_ids` count real tokens only, so padding never shifts
a position, and `response_mask` is 1 on response tokens up to and including EOS.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rlhf_ray.storage import locations

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: str = "cpu") -> torch.dtype:
    """`auto`: bfloat16 on a GPU that computes in it, else float32 (CPUs here run bf16
    matmuls slower than fp32)."""
    if dtype == "auto":
        ok = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else torch.float32
    return DTYPES[dtype]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(locations.local_dir(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_policy(path: str, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        locations.local_dir(path), dtype=resolve_dtype(dtype, device)).to(device)


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """The transformer blocks: the first ModuleList called `layers` (or `h`)."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h"):
            return name, m
    raise ValueError(f"{type(model).__name__}: no list of transformer blocks found")


def top_layers(model, k: int | None) -> list[int] | None:
    """Indices of the top `k` blocks (None: all)."""
    if not k:
        return None
    n = len(decoder_layers(model)[1])
    return list(range(max(0, n - k), n))


def train_top_layers(model, k: int | None) -> None:
    """Freeze all but the top `k` blocks, the final norm and the heads (`model.
    train_top_layers`): backward stops at the lowest trainable block, so a step costs a
    forward pass and a fraction of the backward. Embeddings (and a head tied to them) freeze."""
    keep = top_layers(model, k)
    if keep is None:
        return
    import re

    prefix = re.escape(decoder_layers(model)[0])
    for name, p in model.named_parameters():
        m = re.search(prefix + r"\.(\d+)\.", name)
        p.requires_grad_(int(m.group(1)) in keep if m else "embed" not in name)


@contextmanager
def only_blocks(model, blocks: slice):
    """Run `model` (unwrapped) with only `blocks` of its transformer blocks in place; the
    others are skipped, not run."""
    name, layers = decoder_layers(model)
    parent, attr = block_stack(model), name.rpartition(".")[2]
    parent._modules[attr] = torch.nn.ModuleList(list(layers)[blocks])
    try:
        yield
    finally:
        parent._modules[attr] = layers


def block_stack(model):
    """The module that owns the transformer blocks (LlamaModel in LlamaForCausalLM): it takes
    `inputs_embeds` and skips the heads."""
    name = decoder_layers(model)[0]
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


@torch.no_grad()
def trunk_states(model, k: int, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """The output of blocks 0..k-1 at every position, [B, L, H], running those blocks only.
    Fed back as `inputs_embeds` with `only_blocks(model, slice(k, None))`, the model's top
    blocks give what its full forward gives (checked once per learner: `FrozenTrunk`)."""
    layers = decoder_layers(model)[1]
    out = {}

    def grab(_mod, _args, output):
        out["h"] = output[0] if isinstance(output, tuple) else output

    hook = layers[k - 1].register_forward_hook(grab)
    try:
        with only_blocks(model, slice(0, k)):
            block_stack(model)(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False)
    finally:
        hook.remove()
    return out["h"]


def lora_on(lora: dict | None) -> bool:
    return bool(lora and lora.get("r"))


def with_lora(model, lora: dict | None, adapter_path: str | None = None,
              trainable: bool = True, top: int | None = None):
    """`model` with LoRA adapters (`model.lora` as a dict) through peft: fresh ones (B = 0,
    so the model is unchanged), or a saved adapter folder's; `top`: on the top blocks only.
    Without LoRA, `model` itself."""
    if not lora_on(lora):
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_path:
        return PeftModel.from_pretrained(model, locations.local_dir(adapter_path),
                                         is_trainable=trainable)
    keep = top_layers(model, top)
    return get_peft_model(model, LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM",
        layers_to_transform=keep, layers_pattern=decoder_layers(model)[0].rsplit(".", 1)[-1]
        if keep else None))


def disable_dropout(model):
    """Every dropout of `model` off, in train mode too: `nn.Dropout` modules (LoRA's
    included) and the attention's functional dropout (`attention_dropout`). PPO needs it: a
    token's old log-prob and its new one in the first minibatch must come from one function,
    or the ratio starts away from 1 (TRL turns dropout off in all four models too)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    for cfg in {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
                if c is not None and hasattr(c, "attention_dropout")}.values():
        cfg.attention_dropout = 0.0
    return model


def adapter_state_cpu(model) -> dict[str, torch.Tensor]:
    """A LoRA policy's adapter weights (all a generation worker needs to follow it)."""
    from peft import get_peft_model_state_dict

    model = getattr(model, "module", model)
    return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(model).items()}


class PromptFormat:
    """How the policy reads a prompt: the tokenizer's chat template around the task's
    instruction (the user's turn), the prompt text starting the assistant's turn; or, with no
    template, BOS + the prompt text. A long prompt loses its first tokens, never the
    template's. The reward model and the judges read the plain text (`encode_pairs`)."""

    def __init__(self, tok, instruction: str = "", chat_template: str = "auto",
                 max_prompt_tokens: int = 64):
        self.tok, self.max_prompt = tok, max_prompt_tokens
        has = bool(getattr(tok, "chat_template", None))
        if chat_template == "on" and not has:
            raise ValueError(f"data.chat_template=on: the tokenizer "
                             f"({getattr(tok, 'name_or_path', '?')}) has no chat template")
        self.templated = has and chat_template != "off"
        if self.templated:
            text = tok.apply_chat_template([{"role": "user", "content": instruction}],
                                           tokenize=False, add_generation_prompt=True)
            self.prefix = tok(text, add_special_tokens=False)["input_ids"]
        else:
            self.prefix = [tok.bos_token_id] if tok.bos_token_id is not None else []
        if len(self.prefix) >= max_prompt_tokens:
            raise ValueError(f"data.max_prompt_tokens={max_prompt_tokens}: the chat template "
                             f"and instruction alone take {len(self.prefix)} tokens")

    @classmethod
    def from_dict(cls, tok, d: dict | None, max_prompt_tokens: int = 64) -> "PromptFormat":
        d = d or {}
        return cls(tok, d.get("instruction", ""), d.get("chat_template", "auto"),
                   d.get("max_prompt_tokens", max_prompt_tokens))

    @staticmethod
    def settings(data_cfg) -> dict:
        """What a role needs of the `data` section to read prompts as the policy does."""
        return {"instruction": data_cfg.instruction, "chat_template": data_cfg.chat_template,
                "max_prompt_tokens": data_cfg.max_prompt_tokens}

    def encode(self, prompt: str) -> list[int]:
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        keep = self.max_prompt - len(self.prefix)
        return self.prefix + ids[-keep:] if ids else list(self.prefix)


def load_scalar_model(path: str, dtype: str = "float32", device: str = "cpu"):
    """An LM backbone with a scalar head. From a causal-LM folder the head is a fresh
    `score` layer, initialized as transformers does (weights from N(0, 0.02): small outputs,
    not zero); from a reward-model folder it is the trained head."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        locations.local_dir(path), num_labels=1, dtype=resolve_dtype(dtype, device))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.to(device)


def backbone(model):
    return getattr(model, model.base_model_prefix)


def scalar_head(model):
    for name in ("score", "classifier", "v_head"):
        if hasattr(model, name):
            return getattr(model, name)
    raise ValueError(f"{type(model).__name__}: no scalar head (score/classifier) found")


def token_scalars(model, input_ids, attention_mask, position_ids,
                  inputs_embeds=None) -> torch.Tensor:
    """The scalar head at every position: [B, L] (the critic's values)."""
    feed = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    hidden = backbone(model)(**feed, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=False).last_hidden_state
    return scalar_head(model)(hidden).squeeze(-1).float()


def last_token_scores(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """The scalar head at each row's last real token: [B] (the reward model's score).
    Rows are [left-padded prompt, right-padded response]."""
    values = token_scalars(model, input_ids, attention_mask, position_ids)
    last = (attention_mask * torch.arange(attention_mask.shape[1], device=values.device)).argmax(1)
    return values[torch.arange(values.shape[0], device=values.device), last]


def response_logprobs(model, input_ids, attention_mask, position_ids, prompt_len: int,
                      temperature: float = 1.0, with_entropy: bool = False, inputs_embeds=None):
    """log pi(y_t | x, y_<t) of each response token: [B, T] (and the entropy, [B, T]).

    Only the T positions that predict response tokens go through the LM head
    (`logits_to_keep`): with a 49k vocabulary the head is about a fifth of a small model's
    forward FLOPs, and its [B, L, V] logits dominate the memory of a short-response batch.
    `inputs_embeds`: what enters the blocks instead of `input_ids`' embeddings (a frozen
    trunk's output; the ids then only name the targets)."""
    keep = input_ids.shape[1] - prompt_len + 1
    feed = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    try:
        logits = model(**feed, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, logits_to_keep=keep).logits
    except TypeError:  # a model class without `logits_to_keep`: every position
        logits = model(**feed, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits
    logits = logits[:, -keep:-1].float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    targets = input_ids[:, prompt_len:]
    logp = torch.gather(logp_all, 2, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


class TokenValueModel(torch.nn.Module):
    """The critic as one module whose forward gives the scalar head at every position, plus
    a learned offset `value_bias` (a Llama score head has no bias), so DDP can wrap it (DDP
    syncs gradients only through its wrapped module's forward)."""

    BIAS_FILE = "value_bias.json"  # beside the critic's model folder in a checkpoint

    def __init__(self, scalar_model, bias: float = 0.0):
        super().__init__()
        self.model = scalar_model
        p = next(scalar_model.parameters())
        self.value_bias = torch.nn.Parameter(torch.tensor(float(bias), device=p.device))

    def forward(self, input_ids, attention_mask, position_ids, inputs_embeds=None):
        return token_scalars(self.model, input_ids, attention_mask, position_ids,
                             inputs_embeds) + self.value_bias.float()

    @torch.no_grad()
    def fold_normalization(self, mean: float, std: float) -> None:
        """A critic that starts as the reward model predicts raw scores; PPO's returns are
        normalized ones, (raw - mean) / std: make its head predict those (weights / std,
        offset - mean / std), so its first values are not off by the mean and scale."""
        head = scalar_head(self.model)
        head.weight.div_(std)
        if getattr(head, "bias", None) is not None:
            head.bias.div_(std)
        self.value_bias.copy_((self.value_bias - mean) / std)


def response_values(critic, input_ids, attention_mask, position_ids, prompt_len: int,
                    inputs_embeds=None):
    """V(x, y_<t): the critic's value of the state before each response token, [B, T].
    `critic`: a TokenValueModel (or DDP around one)."""
    values = critic(input_ids, attention_mask, position_ids, inputs_embeds)
    return values[:, prompt_len - 1:-1]


@dataclass
class TokenBatch:
    """[B, P + T] ids with masks; P = prompt_len."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor  # [B, T]
    prompt_len: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx) -> "TokenBatch":
        return TokenBatch(self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx],
                          self.response_mask[idx], self.prompt_len)

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """Each row's real prompt and response length: [B], [B]."""
        p = self.prompt_len
        return (self.attention_mask[:, :p].sum(1).cpu().numpy(),
                self.response_mask.sum(1).cpu().numpy())

    def kept_columns(self) -> slice:
        """The columns `trimmed()` keeps."""
        p = self.prompt_len
        lead = p - int(self.attention_mask[:, :p].sum(1).max())
        return slice(lead, p + max(1, int(self.response_mask.sum(1).max())))

    def trimmed(self) -> "TokenBatch":
        """The same rows without the columns that are padding in every one of them (leading
        prompt columns, trailing response columns), so a micro batch pays for its own
        longest prompt and response, not the whole batch's. Per-token outputs are then
        [B, T'] (T' <= T), aligned with [:, :T'] of the untrimmed batch."""
        cols = self.kept_columns()
        return TokenBatch(self.input_ids[:, cols], self.attention_mask[:, cols],
                          self.position_ids[:, cols], self.response_mask[:, :cols.stop - self.prompt_len],
                          self.prompt_len - cols.start)

    def to(self, device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device),
                          self.position_ids.to(device), self.response_mask.to(device),
                          self.prompt_len)


def sequence_logprobs(model, batch, mean: bool = False):
    """log pi(y | x) of each row of a TokenBatch: [B] (the mean per response token with
    `mean`, as IPO takes it)."""
    lp = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.position_ids,
                           batch.prompt_len)
    mask = batch.response_mask.to(lp.dtype)
    total = (lp * mask).sum(1)
    return total / mask.sum(1).clamp_min(1.0) if mean else total


def make_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
               prompt_len: int | None = None, response_len: int | None = None) -> TokenBatch:
    """Lay out token lists as [left-padded prompt | right-padded response]. Every response
    needs at least one token (a generation worker always returns EOS or a token)."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if any(len(r) == 0 for r in response_ids):
        raise ValueError("an empty response: each needs at least one token (EOS)")
    p = prompt_len or max(len(x) for x in prompt_ids)
    t = response_len or max(len(y) for y in response_ids)
    b = len(prompt_ids)
    ids = torch.full((b, p + t), pad_id, dtype=torch.long)
    attn = torch.zeros((b, p + t), dtype=torch.long)
    for i, (x, y) in enumerate(zip(prompt_ids, response_ids)):
        x, y = list(x)[-p:], list(y)[:t]
        ids[i, p - len(x):p] = torch.tensor(x, dtype=torch.long)
        ids[i, p:p + len(y)] = torch.tensor(y, dtype=torch.long)
        attn[i, p - len(x):p + len(y)] = 1
    pos = (attn.cumsum(1) - 1).clamp_min(0)
    return TokenBatch(ids, attn, pos, attn[:, p:].clone(), p)


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_prompt_tokens: int,
                 max_response_tokens: int, fmt: PromptFormat | None = None,
                 finished: list[bool] | None = None) -> TokenBatch:
    """Text (prompt, response) pairs -> a TokenBatch; responses end with EOS unless cut at
    `max_response_tokens` or, per `finished`, the policy never ended them (cut at its
    `generation.max_new_tokens`: a truncated answer must not read as a complete one).
    `fmt`: read prompts as the policy does (chat template); default BOS + plain text."""
    fmt = fmt or PromptFormat(tokenizer, chat_template="off", max_prompt_tokens=max_prompt_tokens + 1)
    pids = [fmt.encode(p) for p in prompts]
    rids = []
    for i, r in enumerate(responses):  # a response cut short gets no EOS: it did not end
        ids = tokenizer(r, add_special_tokens=False)["input_ids"]
        ended = finished is None or bool(finished[i])
        rids.append(ids[:max_response_tokens] if len(ids) >= max_response_tokens or not ended
                    else ids + [tokenizer.eos_token_id])
    return make_batch(pids, rids, tokenizer.pad_token_id)


def state_dict_cpu(model) -> dict[str, torch.Tensor]:
    """Weights to ship to generation workers (unwrapped from DDP, detached, on CPU)."""
    model = getattr(model, "module", model)
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def save_model(model, tokenizer, out_dir: str | Path) -> str:
    """A Hugging Face folder (safetensors) at `out_dir`, a path or a URI; returns it."""
    with locations.writable_dir(str(out_dir)) as out:
        getattr(model, "module", model).save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    return locations.normalize(out_dir)
