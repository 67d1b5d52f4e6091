"""The `reviews` task: positive continuations of movie reviews, learned from human ratings.

Ziegler et al. 2019's task on real human data: prompts are the first words of Rotten Tomatoes
review snippets, the policy continues them, and the reward model is fitted to comparisons
derived from people's ratings of the snippets (Hutto & Gilbert 2014: 10,605 snippets, each
rated -4..+4 by about 20 people; the `rt-ratings` asset).

The snippets are split once, by snippet id and `data.reviews.split_seed` (not the run's seed,
so every seed of a run sees the same splits), into disjoint parts:

  yardstick      the MiniLM probe that reports success (trained on 80%, its accuracy on 20%)
  oracle         the simulated rater that answers online queries (`labels.per_iteration`)
  reward_model   the human comparisons the reward model is fitted to
  eval           held-out prompts for the yardstick's verdict
  ppo            the prompts PPO trains on
  sft            the demonstrations (prompt words -> the rest of the snippet); the remainder

A comparison is a pair of reward-model snippets whose mean ratings differ by at least
`min_margin`; its label `mu` is the chance that a rater of the chosen snippet scored it above a
rater of the other (ties count half), from the per-rater scores: the people's real
disagreement, which the Bradley-Terry loss then takes as a soft label.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from rlhf_ray.llm import assets
from rlhf_ray.llm.config import DataConfig, ReviewsConfig

SPLITS = ("yardstick", "oracle", "reward_model", "eval", "ppo", "sft")


@dataclass(frozen=True)
class Snippet:
    id: int
    mean: float
    text: str


def _clean(text: str) -> str:
    text = text.replace("''", '"').replace("``", '"')
    return re.sub(r"\s+", " ", text).strip()


def read_snippets(path: str | Path) -> list[Snippet]:
    """`id<TAB>mean rating<TAB>text` rows under an `id sentiment text` header (the
    GroundTruth file's layout); one ValueError line naming the file and row otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"ratings file {p}: no such file")
    lines = p.read_text(encoding="utf-8", errors="strict").splitlines()
    if not lines:
        raise ValueError(f"ratings file {p}: empty")
    header = [h.strip().lower() for h in lines[0].split("\t")]
    if header[:3] != ["id", "sentiment", "text"]:
        raise ValueError(f"ratings file {p}: header {lines[0][:60]!r} lacks the columns "
                         "id, sentiment, text (tab-separated)")
    out = []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) < 3 or not parts[2].strip():
            raise ValueError(f"ratings file {p}: line {n} has {len(parts)} of the 3 columns "
                             "id, sentiment, text")
        try:
            sid, mean = int(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(f"ratings file {p}: line {n}: id {parts[0][:20]!r} or rating "
                             f"{parts[1][:20]!r} is not a number") from None
        if not -4.0 <= mean <= 4.0:
            raise ValueError(f"ratings file {p}: line {n}: rating {mean} is outside -4..4")
        out.append(Snippet(sid, mean, _clean(parts[2])))
    if not out:
        raise ValueError(f"ratings file {p}: no rows")
    return out


def read_raters(path: str | Path) -> dict[int, np.ndarray]:
    """`id<TAB>mean<TAB>std<TAB>[r1, r2, ...]` rows (the anonDataRatings file): id -> scores."""
    p = Path(path)
    out = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            out[int(parts[0])] = np.asarray(json.loads(parts[3]), dtype=np.float64)
        except (IndexError, ValueError, TypeError):
            raise ValueError(f"per-rater file {p}: line {n} is not id, mean, std, [scores]") from None
    return out


def preference_prob(a: np.ndarray, b: np.ndarray) -> float:
    """P(a rater's score of A > a rater's score of B), ties counting half."""
    d = a[:, None] - b[None, :]
    return float(((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size)


class ReviewsTask:
    """The splits and everything derived from them; `cfg`: an `DataConfig`'s `reviews`."""

    def __init__(self, cfg):
        self.cfg = cfg
        folder = Path(assets.resolve(cfg.ratings_path))
        snippets_file = folder / "snippets.tsv" if folder.is_dir() else folder
        raters_file = folder / "raters.tsv" if folder.is_dir() else None
        self.snippets = read_snippets(snippets_file)
        self.raters = read_raters(raters_file) if raters_file and raters_file.exists() else {}
        self.key = hashlib.sha256(snippets_file.read_bytes()).hexdigest()[:12]
        order = np.random.default_rng(cfg.split_seed).permutation(len(self.snippets))
        sizes = cfg.split.model_dump()
        need = sum(sizes.values())
        if need >= len(self.snippets):
            raise ValueError(f"data.reviews.split: {need} snippets asked for, the ratings "
                             f"file has {len(self.snippets)} (the sft split takes the rest)")
        self.parts: dict[str, list[Snippet]] = {}
        at = 0
        for name in SPLITS[:-1]:
            self.parts[name] = [self.snippets[i] for i in order[at:at + sizes[name]]]
            at += sizes[name]
        self.parts["sft"] = [self.snippets[i] for i in order[at:]]

    def ids(self, split: str) -> set[int]:
        return {s.id for s in self.parts[split]}

    # ---------------------------------------------------------------- prompts and SFT
    def cut(self, s: Snippet) -> tuple[str, str] | None:
        """(the first `prompt_words` words, the rest) of a snippet long enough to continue."""
        words = s.text.split(" ")
        k = self.cfg.prompt_words
        if len(words) < k + 3:
            return None
        return " ".join(words[:k]), " " + " ".join(words[k:])

    def prompts(self, split: str) -> list[str]:
        """A split's prompts; the eval split's leave out any opening that another split's
        snippets share (different snippets can start with the same words)."""
        out = [c[0] for s in self.parts[split] if (c := self.cut(s))]
        if split == "eval":
            seen = {c[0] for name in ("sft", "ppo") for s in self.parts[name] if (c := self.cut(s))}
            out = [p for p in out if p not in seen]
        return out

    def sft_rows(self) -> list[dict]:
        return [{"prompt": c[0], "response": c[1]} for s in self.parts["sft"] if (c := self.cut(s))]

    # ---------------------------------------------------------------- comparisons
    def comparisons(self) -> tuple[list[dict], dict]:
        """Pairs of reward-model snippets whose mean ratings differ by at least
        `min_margin` ({prompt: "", chosen, rejected, mu}) and what the raters say about them."""
        part = self.parts["reward_model"]
        rng = np.random.default_rng(self.cfg.split_seed + 1)
        rows, mus, seen = [], [], set()
        tries = 0
        while len(rows) < self.cfg.num_pairs and tries < 50 * self.cfg.num_pairs:
            tries += 1
            i, j = rng.integers(len(part), size=2)
            a, b = part[i], part[j]
            if i == j or (min(i, j), max(i, j)) in seen or abs(a.mean - b.mean) < self.cfg.min_margin:
                continue
            seen.add((min(i, j), max(i, j)))
            hi, lo = (a, b) if a.mean > b.mean else (b, a)
            mu = 1.0
            if hi.id in self.raters and lo.id in self.raters:
                mu = preference_prob(self.raters[hi.id], self.raters[lo.id])
            mus.append(mu)
            rows.append({"prompt": "", "chosen": hi.text, "rejected": lo.text,
                         "mu": mu if self.cfg.soft_labels else 1.0,
                         "ids": [hi.id, lo.id]})
        mus = np.asarray(mus)
        stats = {"pairs": len(rows), "min_margin": self.cfg.min_margin,
                 "with_rater_scores": int(sum(r["ids"][0] in self.raters for r in rows)),
                 "rater_agreement_mean": float(mus.mean()) if len(mus) else None,
                 "rater_disagreement": float(1 - mus.mean()) if len(mus) else None,
                 "pairs_raters_split_over_25pct": float((mus < 0.75).mean()) if len(mus) else None}
        return rows, stats


@lru_cache(maxsize=4)
def _task(cfg_json: str) -> ReviewsTask:
    return ReviewsTask(ReviewsConfig.model_validate_json(cfg_json))


def task(cfg) -> ReviewsTask:
    """One ReviewsTask per process and config (`cfg`: the `data.reviews` section)."""
    return _task(cfg.model_dump_json())


def review_text(prompt: str, response: str) -> str:
    """The review a (prompt words, continuation) pair makes, as the scorers read it."""
    return f"{prompt.rstrip()} {response.strip()}".strip()


# -------------------------------------------------------------------- the simulated rater


class RaterOracle:
    """The online labeler's stand-in for people: ridge regression on TF-IDF word uni- and
    bigrams, fitted to the oracle split's mean ratings; scores a review by its predicted
    mean rating. A different model from the yardstick, on different snippets."""

    def __init__(self, reviews_cfg):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import Ridge

        part = task(reviews_cfg).parts["oracle"]
        self.vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        x = self.vec.fit_transform([s.text for s in part])
        self.model = Ridge(alpha=1.0).fit(x, np.array([s.mean for s in part]))

    def score_texts(self, texts: list[str]) -> np.ndarray:
        return self.model.predict(self.vec.transform(texts))

    def __call__(self, prompt: str, response: str) -> float:
        return float(self.score_texts([review_text(prompt, response)])[0])


def oracle(data_cfg: dict):
    """`labeler.oracle: rlhf_ray.llm.reviews:oracle` (built from the run's `data` section)."""

    return RaterOracle(DataConfig.model_validate(data_cfg).reviews)


oracle.from_data_config = True
