"""The yardstick: what says whether an LLM run succeeded. Never the training signal.

`eval.yardstick` names a `module:function`. A plain function scores one (prompt, response)
as a float (the tiny task's oracle); a function marked `from_data_config` is a factory called
with the run's `data` section, whose result scores a batch: `score(prompts, responses) ->
{"score": [...], other named scores}`.

The `reviews` task's yardstick (`rlhf_ray.llm.yardstick:minilm_probe`): a logistic probe on
all-MiniLM-L6-v2 sentence embeddings (mean-pooled, normalized, as sentence-transformers does),
fitted to the sign of the mean human rating on the task's `yardstick` split -- snippets no
other part of the run sees -- and scoring P(positive); VADER's compound score (a lexicon, a
different kind of model altogether) is reported beside it as `vader`.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from rlhf_ray.feedback.queries import load_text_oracle
from rlhf_ray.llm import assets
from rlhf_ray.llm.config import DataConfig
from rlhf_ray.llm.reviews import review_text, task


class MiniLMEncoder:
    def __init__(self, folder: str, threads: int = 1):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        torch.set_num_threads(threads)
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()

    def __call__(self, texts: list[str], batch: int = 64) -> np.ndarray:
        torch = self.torch
        out = []
        with torch.no_grad():
            for s in range(0, len(texts), batch):
                b = self.tok(texts[s:s + batch], padding=True, truncation=True, max_length=128,
                             return_tensors="pt")
                h = self.model(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
                out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


class MiniLMProbe:
    """P(positive) from a logistic probe on MiniLM embeddings, plus VADER's compound score.
    The fitted probe is cached beside the assets (keyed by the data, the split and encoder)."""

    def __init__(self, reviews_cfg, encoder: str = "minilm-l6", threads: int = 1):
        from sklearn.linear_model import LogisticRegression
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        t = task(reviews_cfg)
        self.encode = MiniLMEncoder(assets.resolve(encoder), threads)
        self.vader = SentimentIntensityAnalyzer()
        part = [s for s in t.parts["yardstick"] if s.mean != 0]
        key = hashlib.sha256(json.dumps(
            [t.key, reviews_cfg.model_dump(mode="json"), encoder]).encode()).hexdigest()[:16]
        cache = assets.cache_root() / "probes" / f"minilm-{key}.npz"
        if cache.exists():
            z = np.load(cache)
            coef, bias, self.held_out_accuracy = z["coef"], float(z["bias"]), float(z["acc"])
        else:
            n_fit = int(0.8 * len(part))
            x = self.encode([s.text for s in part])
            y = np.array([s.mean > 0 for s in part], dtype=int)
            probe = LogisticRegression(C=1.0, max_iter=2000).fit(x[:n_fit], y[:n_fit])
            coef, bias = probe.coef_[0].astype(np.float32), float(probe.intercept_[0])
            self.held_out_accuracy = float(probe.score(x[n_fit:], y[n_fit:]))
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, coef=coef, bias=bias, acc=self.held_out_accuracy)
            tmp.rename(cache)
        self.coef, self.bias = coef, bias

    def score(self, prompts: list[str], responses: list[str]) -> dict[str, np.ndarray]:
        texts = [review_text(p, r) for p, r in zip(prompts, responses)]
        logits = self.encode(texts) @ self.coef + self.bias
        return {"score": 1.0 / (1.0 + np.exp(-logits)),
                "vader": np.array([self.vader.polarity_scores(t)["compound"] for t in texts])}


def minilm_probe(data_cfg: dict):
    return MiniLMProbe(DataConfig.model_validate(data_cfg).reviews)


minilm_probe.from_data_config = True


class _PerPair:
    """A (prompt, response) -> float function as a batch scorer."""

    def __init__(self, fn):
        self.fn = fn

    def score(self, prompts, responses) -> dict[str, np.ndarray]:
        return {"score": np.array([float(self.fn(p, r)) for p, r in zip(prompts, responses)])}


def load_scorer(spec: str, data_cfg: dict | None = None, what: str = "eval.yardstick"):
    """`module:function` (loaded as the labeler loads its oracle) -> an object with
    `score(prompts, responses) -> dict`."""

    obj = load_text_oracle(spec, data_cfg, what)
    return obj if hasattr(obj, "score") else _PerPair(obj)


def load_yardstick(cfg):
    """The run's yardstick (`eval.yardstick`, else the labeler's oracle)."""
    return load_scorer(cfg.eval.yardstick or cfg.labeler.oracle, cfg.data.model_dump(mode="json"))


def disagreement(rm: list[float], judge: list[float], window: int = 5) -> dict | None:
    """Gao et al. 2022's warning sign over the last `window` evaluations: the reward model's
    score rising while the yardstick's falls or stays flat. Returns the two slopes (per
    evaluation, each in units of its own spread over the run) when they part ways."""
    if len(rm) < window or len(judge) < window:
        return None
    r, j = np.asarray(rm[-window:], float), np.asarray(judge[-window:], float)
    x = np.arange(window) - (window - 1) / 2
    sr = float((x * (r - r.mean())).sum() / (x ** 2).sum()) / (np.std(rm) + 1e-9)
    sj = float((x * (j - j.mean())).sum() / (x ** 2).sum()) / (np.std(judge) + 1e-9)
    if sr > 0.2 and sj <= 0.05:
        return {"rm_slope": sr, "yardstick_slope": sj}
    return None
