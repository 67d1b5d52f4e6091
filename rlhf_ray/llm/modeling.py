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

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_policy(path: str, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device)


def load_scalar_model(path: str, dtype: str = "float32", device: str = "cpu"):
    """An LM backbone with a scalar head. From a causal-LM folder the head starts at zero
    output scale (a fresh `score` layer); from a reward-model folder it is the trained head."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=DTYPES[dtype])
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


def token_scalars(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """The scalar head at every position: [B, L] (the critic's values)."""
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=False).last_hidden_state
    return scalar_head(model)(hidden).squeeze(-1).float()


def last_token_scores(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """The scalar head at each row's last real token: [B] (the reward model's score).
    Rows are [left-padded prompt, right-padded response]."""
    values = token_scalars(model, input_ids, attention_mask, position_ids)
    last = (attention_mask * torch.arange(attention_mask.shape[1], device=values.device)).argmax(1)
    return values[torch.arange(values.shape[0], device=values.device), last]


def response_logprobs(model, input_ids, attention_mask, position_ids, prompt_len: int,
                      temperature: float = 1.0, with_entropy: bool = False):
    """log pi(y_t | x, y_<t) of each response token: [B, T] (and the entropy, [B, T])."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids, use_cache=False).logits
    logits = logits[:, prompt_len - 1:-1].float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    targets = input_ids[:, prompt_len:]
    logp = torch.gather(logp_all, 2, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


class TokenValueModel(torch.nn.Module):
    """The critic as one module whose forward gives the scalar head at every position, so
    DDP can wrap it (DDP syncs gradients only through its wrapped module's forward)."""

    def __init__(self, scalar_model):
        super().__init__()
        self.model = scalar_model

    def forward(self, input_ids, attention_mask, position_ids):
        return token_scalars(self.model, input_ids, attention_mask, position_ids)


def response_values(critic, input_ids, attention_mask, position_ids, prompt_len: int):
    """V(x, y_<t): the critic's value of the state before each response token, [B, T].
    `critic`: a TokenValueModel (or DDP around one)."""
    values = critic(input_ids, attention_mask, position_ids)
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

    def to(self, device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device),
                          self.position_ids.to(device), self.response_mask.to(device),
                          self.prompt_len)


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
                 max_response_tokens: int) -> TokenBatch:
    """Text (prompt, response) pairs -> a TokenBatch; responses end with EOS."""
    pids = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for p in prompts]
    pids = [[tokenizer.bos_token_id] + x if tokenizer.bos_token_id is not None else x for x in pids]
    rids = [tokenizer(r, add_special_tokens=False)["input_ids"][:max_response_tokens - 1]
            + [tokenizer.eos_token_id] for r in responses]
    return make_batch(pids, rids, tokenizer.pad_token_id)


def state_dict_cpu(model) -> dict[str, torch.Tensor]:
    """Weights to ship to generation workers (unwrapped from DDP, detached, on CPU)."""
    model = getattr(model, "module", model)
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def save_model(model, tokenizer, out_dir: str | Path) -> str:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    getattr(model, "module", model).save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return str(out)
