"""The real-model path of the LLM workload: GGUF conversion, the real SmolLM2 tokenizer's chat
template and EOS = pad masking, and the reviews task's data split rules on the real ratings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.llm import assets
from rlhf_ray.llm.config import DataConfig

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------ GGUF conversion


def _write_tiny_gguf(folder):
    """A tiny Llama (byte-level BPE tokenizer trained here) written as an F32 GGUF file with
    the `gguf` package, q/k rows in llama.cpp's rotary layout as converters write them."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the film is a delight and the cast is great"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    heads, kv = 4, 2
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    w = gguf.GGUFWriter(str(folder / "tiny.gguf"), "llama")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length(64)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(8)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    for i in range(2):
        for a, b in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                     ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                     ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                     ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                     ("post_attention_layernorm", "ffn_norm")):
            names[f"model.layers.{i}.{a}.weight"] = f"blk.{i}.{b}.weight"

    def rotary_rows(x, n):
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    for k, v in model.state_dict().items():
        x = v.numpy().astype(np.float32)
        if "q_proj" in k:
            x = rotary_rows(x, heads)
        elif "k_proj" in k:
            x = rotary_rows(x, kv)
        w.add_tensor(names[k], x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


def test_a_gguf_file_converts_to_the_model_it_came_from(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.llm.convert import check_causal_lm, gguf_to_hf

    model, tok = _write_tiny_gguf(tmp_path)
    out = gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert (out / "model.safetensors").exists() and not list(out.glob("*.gguf"))
    check_causal_lm(str(out))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    back = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    back_tok = AutoTokenizer.from_pretrained(str(out))
    text = "the cast is a delight"
    ids = tok.encode(text).ids
    assert back_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert back_tok.decode(ids) == text
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, back(x).logits, atol=1e-5)


def test_a_file_that_is_not_a_gguf_model_is_refused_in_one_line(tmp_path):
    from rlhf_ray.llm.convert import gguf_to_hf

    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=r"not a GGUF file") as e:
        gguf_to_hf(bad, tmp_path / "out")
    assert "\n" not in str(e.value)
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 7)
    with pytest.raises(ValueError, match=r"does not convert") as e:
        gguf_to_hf(trunc, tmp_path / "out2")
    assert "\n" not in str(e.value) and not (tmp_path / "out2").exists()


def test_a_folder_that_is_not_a_causal_lm_is_refused_before_anything_starts(tmp_path):
    from rlhf_ray.llm.data import check

    enc = tmp_path / "encoder"
    enc.mkdir()
    (enc / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    cfg = load_config("llm-tiny-smoke", [f"model.policy={enc}"])
    with pytest.raises(ValueError, match=r"model.policy: .*not a causal language model .*BertModel"):
        check(cfg)
    cfg = load_config("llm-tiny-smoke", [f"model.sft_path={tmp_path}"])
    with pytest.raises(ValueError, match=r"model.sft_path: .*no config.json"):
        check(cfg)


# ------------------------------------------------------------------ the real tokenizer


@pytest.fixture(scope="module")
def smol_tok():
    from rlhf_ray.llm.modeling import load_tokenizer

    return load_tokenizer(str(assets.get("smollm2-135m", quiet=True)))


def test_the_chat_template_wraps_the_instruction_and_the_prompt_starts_the_answer(smol_tok):
    from rlhf_ray.llm.modeling import PromptFormat

    tok = smol_tok
    assert tok.eos_token_id == tok.pad_token_id and len(tok) == 49152
    fmt = PromptFormat(tok, "Continue the movie review.", "auto", 48)
    ids = fmt.encode("The film is")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nContinue the movie review.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\nThe film is")
    assert ids.count(tok.bos_token_id) == 3  # system, user, assistant turns; no extra BOS
    # a long prompt loses its own first tokens, never the template's
    long = fmt.encode("word " * 200 + "the end")
    assert len(long) == 48 and long[:len(fmt.prefix)] == fmt.prefix
    assert tok.decode(long).endswith("the end")
    off = PromptFormat(tok, "ignored", "off", 48).encode("The film is")
    assert off == [tok.bos_token_id] + tok("The film is", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match=r"max_prompt_tokens=10: the chat template .* take"):
        PromptFormat(tok, "Continue the movie review.", "on", 10)


def test_a_tokenizer_without_a_template_is_refused_when_one_is_asked_for(tmp_path):
    from rlhf_ray.llm.modeling import PromptFormat
    from rlhf_ray.llm.tiny import build_tokenizer

    tok = build_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"data.chat_template=on: the tokenizer .* no chat template"):
        PromptFormat(tok, "", "on", 16)
    assert PromptFormat(tok, "", "auto", 16).prefix == [tok.bos_token_id]


def test_eos_equal_to_pad_is_masked_by_length_not_by_id(smol_tok):
    """SmolLM2's EOS is its pad token: masks come from lengths, EOS stays a trained token,
    a response cut at the limit gets no EOS, and generation stops at the first EOS."""
    from rlhf_ray.llm.generation import _cut_at_eos
    from rlhf_ray.llm.modeling import PromptFormat, encode_pairs

    tok = smol_tok
    eos = tok.eos_token_id
    fmt = PromptFormat(tok, "Continue the movie review.", "auto", 48)
    b = encode_pairs(tok, ["The film is", "A"], [" a delight, café crème", " long" * 30], 48, 12, fmt)
    r0 = tok(" a delight, café crème", add_special_tokens=False)["input_ids"]
    t = b.response_mask.shape[1]
    assert t == 12
    # row 0: its tokens and EOS are in the mask, the pad after them (same id) is not
    assert b.response_mask[0].tolist() == [1] * (len(r0) + 1) + [0] * (t - len(r0) - 1)
    assert b.input_ids[0, b.prompt_len + len(r0)].item() == eos
    assert (b.input_ids[0, b.prompt_len + len(r0) + 1:] == eos).all()  # padding = EOS id
    assert tok.decode(b.input_ids[0, b.prompt_len:b.prompt_len + len(r0)]) == " a delight, café crème"
    # row 1: cut at 12 tokens, no EOS
    assert b.response_mask[1].sum() == 12 and eos not in b.input_ids[1, b.prompt_len:].tolist()
    # the shorter prompt is left padded, and the padding is out of attention
    p1 = len(fmt.encode("A"))
    assert b.attention_mask[1, :b.prompt_len - p1].sum() == 0
    assert b.position_ids[1, b.prompt_len - p1].item() == 0
    assert _cut_at_eos([5, 6, eos, eos, eos], eos, eos) == [5, 6, eos]


# ------------------------------------------------------------------ the reviews task


@pytest.fixture(scope="module")
def reviews():
    from rlhf_ray.llm.reviews import ReviewsTask

    return ReviewsTask(DataConfig().reviews)


def test_the_splits_are_disjoint_and_the_reward_model_never_sees_the_judges_snippets(reviews):
    t = reviews
    ids = {name: t.ids(name) for name in t.parts}
    assert sum(map(len, ids.values())) == len(t.snippets) == 10605
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not ids[a] & ids[b], (a, b)
    rows, stats = t.comparisons()
    used = {i for r in rows for i in r["ids"]}
    assert used <= ids["reward_model"]
    texts = {s.text for s in t.parts["yardstick"]} | {s.text for s in t.parts["oracle"]}
    assert not texts & {x for r in rows for x in (r["chosen"], r["rejected"])}
    # every kept pair is clearly apart on the mean rating; mu is the raters' own agreement
    by_id = {s.id: s for s in t.snippets}
    assert all(by_id[a].mean - by_id[b].mean >= t.cfg.min_margin for a, b in (r["ids"] for r in rows))
    mus = np.array([r["mu"] for r in rows])
    assert (mus >= 0.5).all() and (mus <= 1).all() and mus.std() > 0
    assert stats["pairs"] == len(rows) and 0 < stats["rater_disagreement"] < 0.5
    # evaluation prompts are held out from SFT and PPO prompts
    sft_prompts = {r["prompt"] for r in t.sft_rows()}
    held = set(t.prompts("eval"))
    assert held and not held & sft_prompts and not held & set(t.prompts("ppo"))


def test_the_split_is_the_same_for_every_run_seed():
    from rlhf_ray.llm.data import load_prompts

    a = load_prompts(load_config("smollm2-reviews", ["seed=0"]), "eval")
    b = load_prompts(load_config("smollm2-reviews", ["seed=3"]), "eval")
    assert a == b and len(a) > 200


@pytest.mark.parametrize("text,match", [
    ("id\tmean\n1\t2.0\n", r"lacks the columns id, sentiment, text"),
    ("id\tsentiment\ttext\n1\t2.0\n", r"line 2 has 2 of the 3 columns"),
    ("id\tsentiment\ttext\n1\tgood\tfine film\n", r"line 2: .*'good' is not a number"),
    ("id\tsentiment\ttext\n1\t9\tfine film\n", r"line 2: rating 9.0 is outside -4..4"),
])
def test_a_bad_ratings_file_gets_one_line_naming_what_is_wrong(tmp_path, text, match):
    from rlhf_ray.llm.data import check

    f = tmp_path / "ratings.tsv"
    f.write_text(text)
    cfg = load_config("llm-tiny-smoke", ["data.task=reviews", f"data.reviews.ratings_path={f}"])
    with pytest.raises(ValueError, match=match) as e:
        check(cfg)
    assert "\n" not in str(e.value) and str(f) in str(e.value)


def test_the_judges_are_independent_models_that_agree_with_people(reviews):
    """The yardstick (MiniLM probe) and the online oracle (TF-IDF ridge), each fitted on its
    own split, rank held-out snippets by sign better than chance and better than VADER."""
    from rlhf_ray.llm.reviews import RaterOracle
    from rlhf_ray.llm.yardstick import MiniLMProbe

    cfg = DataConfig().reviews
    probe, oracle = MiniLMProbe(cfg), RaterOracle(cfg)
    held = reviews.parts["eval"]
    truth = np.array([s.mean > 0 for s in held])
    scores = probe.score([""] * len(held), [s.text for s in held])
    acc_probe = np.mean((scores["score"] > 0.5) == truth)
    acc_vader = np.mean((scores["vader"] > 0) == truth)
    acc_oracle = np.mean((oracle.score_texts([s.text for s in held]) > 0) == truth)
    assert acc_probe > 0.68 and acc_oracle > 0.65 and acc_probe > acc_vader, (
        acc_probe, acc_oracle, acc_vader)
    assert probe.held_out_accuracy > 0.68


def test_the_over_optimization_warning_fires_when_the_proxy_rises_and_the_judge_does_not():
    from rlhf_ray.llm.yardstick import disagreement

    # the picture measured on llm-tiny: reward model 0.9 -> 11.4, the oracle flat near 0
    rm = [0.9, 3.0, 5.5, 7.9, 9.6, 11.4]
    flat = [-0.25, 0.0, 0.01, -0.01, 0.0, 0.0]
    assert disagreement(rm, flat) is not None
    assert disagreement(rm, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) is None  # both rise: fine
    assert disagreement(rm[:4], flat[:4]) is None  # too few evaluations to say
    falling = [0.6, 0.55, 0.5, 0.45, 0.4, 0.35]
    gap = disagreement(rm, falling)
    assert gap["rm_slope"] > 0 and gap["yardstick_slope"] < 0
