"""Model folders: GGUF -> Hugging Face conversion, and the check that a folder is a causal LM.

transformers reads a GGUF file (`from_pretrained(dir, gguf_file=...)`, through the `gguf`
package) and dequantizes its tensors; the model it returns still carries the GGUF
quantization setting, so `save_pretrained` refuses it. The conversion copies the weights into
a model built from the same config without that setting and saves that: an ordinary
safetensors folder with the tokenizer (and its chat template) beside it.
"""

from __future__ import annotations

import json
from pathlib import Path


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, source: str = "",
               dtype: str = "float32") -> Path:
    """Convert a GGUF causal LM to a Hugging Face folder; a file that is not a GGUF model
    gives one ValueError line naming it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ValueError(f"{gguf_path}: no such GGUF file")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{gguf_path}: not a GGUF file (no GGUF magic bytes)")
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                      dtype=getattr(torch, dtype))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{gguf_path}: does not convert to a transformers causal LM "
                         f"({type(exc).__name__}: {first[:200]})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "rotary" not in m and "lm_head" not in m]:
        raise ValueError(f"{gguf_path}: weights do not fit the config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.generation_config = loaded.generation_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    (out / "rlhf_ray_source.json").write_text(json.dumps(
        {"converted_from": source or gguf_path.name, "dtype": dtype,
         "note": "weights dequantized from the GGUF file's quantized tensors"}, indent=1))
    return out


def check_causal_lm(path: str) -> None:
    """A local folder given as a model must hold a causal LM config; one ValueError line
    otherwise. Hub ids (not local paths) are left to transformers."""
    p = Path(path)
    if not p.exists():
        return
    cfg_file = p / "config.json"
    if not p.is_dir() or not cfg_file.is_file():
        raise ValueError(f"{path}: not a model folder (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}/config.json: not JSON ({exc.msg})") from None
    archs = cfg.get("architectures") or []
    if not any(a.endswith(("ForCausalLM", "ForSequenceClassification", "LMHeadModel"))
               for a in archs):
        raise ValueError(f"{path}: not a causal language model (architectures: "
                         f"{', '.join(archs) or 'none'})")
