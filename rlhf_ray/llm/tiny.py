"""A language-model workload that runs where no model hub is reachable.

Everything is built here: a word-level tokenizer trained with `tokenizers` on the task's own
text, a tiny Llama-architecture causal LM from a `transformers` config, a generated task
(prompts, SFT demonstrations) and the oracle preference on it. Saved with `save_pretrained`,
the result is an ordinary Hugging Face model folder: every stage loads it by path exactly as
it would load a hub model by name.

The task, `sentiment`: a prompt asks for a few words about a topic ("write about the fox :");
the SFT demonstrations are fluent but indifferent (positive, negative and neutral words
mixed, the topic sometimes named). The oracle prefers responses that are positive and name
the topic -- the tiny analogue of the IMDB positive-review task of Ziegler et al. 2019 -- so
the SFT model scores near zero and RLHF has clear room to improve.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TOPICS = ["cat", "dog", "fox", "owl", "bear", "wolf", "deer", "frog", "hare", "crow"]
POSITIVE = ["good", "great", "happy", "kind", "bright", "warm", "lovely", "nice", "calm", "brave"]
NEGATIVE = ["bad", "sad", "cruel", "dark", "cold", "angry", "ugly", "mean", "dull", "weak"]
NEUTRAL = ["the", "a", "is", "was", "runs", "sees", "eats", "likes", "near", "with", "and",
           "very", "today", "here", "sleeps", "walks"]
PROMPT_WORDS = ["write", "about", ":"]
SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
_POS, _NEG = set(POSITIVE), set(NEGATIVE)


def sentiment_oracle(prompt: str, response: str) -> float:
    """The task's preference: mean word sentiment (+1 positive, -1 negative, 0 otherwise),
    plus 0.5 when the response names the prompt's topic; -1 for an empty response."""
    words = response.split()
    if not words:
        return -1.0
    score = sum((w in _POS) - (w in _NEG) for w in words) / len(words)
    topic = prompt.split()[-2] if len(prompt.split()) >= 2 else ""
    return float(score + (0.5 if topic in words else 0.0))


def prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"write about the {TOPICS[i]} :" for i in rng.integers(0, len(TOPICS), n)]


def demonstration(prompt: str, rng: np.random.Generator) -> str:
    """An indifferent demonstration: 3-8 words, sentiment words of both signs equally likely."""
    topic = prompt.split()[-2]
    n = int(rng.integers(3, 9))
    words = []
    for _ in range(n):
        u = rng.random()
        if u < 0.5:
            words.append(NEUTRAL[rng.integers(len(NEUTRAL))])
        elif u < 0.7:
            words.append(POSITIVE[rng.integers(len(POSITIVE))])
        elif u < 0.9:
            words.append(NEGATIVE[rng.integers(len(NEGATIVE))])
        else:
            words.append(topic if rng.random() < 0.6 else TOPICS[rng.integers(len(TOPICS))])
    return " ".join(words)


def preference_file(path: str | Path, n: int, seed: int) -> Path:
    """A chosen/rejected JSONL file (what `data.preferences_path` reads) of n pairs of
    demonstrations, each pair ordered by the oracle: data for the `rm` and `dpo` stages."""
    rng = np.random.default_rng(0)
    lines = []
    for p in prompts(n, seed):
        a, b = demonstration(p, rng), demonstration(p, rng)
        if sentiment_oracle(p, a) < sentiment_oracle(p, b):
            a, b = b, a
        lines.append(json.dumps({"prompt": p, "chosen": a, "rejected": b}))
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def sft_examples(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed + 1)
    return [{"prompt": p, "response": demonstration(p, rng)} for p in prompts(n, seed)]


def build_tokenizer(out_dir: str | Path):
    """A word-level tokenizer trained with `tokenizers` on the task's vocabulary, saved as a
    `PreTrainedTokenizerFast` (pad, bos, eos, unk special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL.values()))
    corpus = [" ".join(TOPICS + POSITIVE + NEGATIVE + NEUTRAL + PROMPT_WORDS + ["the"])]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIAL["pad"], bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"], unk_token=SPECIAL["unk"])
    fast.padding_side = "left"  # prompts are left padded for generation
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(out_dir: str | Path, hidden_size: int = 128, num_layers: int = 2,
                num_heads: int = 4, intermediate_size: int = 256, seed: int = 0,
                max_position_embeddings: int = 128):
    """A randomly initialized tiny Llama causal LM and its tokenizer, saved to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_heads, max_position_embeddings=max_position_embeddings,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(out))  # safetensors
    (out / "rlhf_ray_tiny.json").write_text(json.dumps({"task": "sentiment", "seed": seed}))
    return model, tok
