"""Reward normalization for PPO on language models, measured again for every reward model.

InstructGPT normalizes the reward model's score so that the SFT model scores 0 on average:
scores become (raw - mean) / std with the mean and std of the reward model's raw scores of
SFT samples (the held-out evaluation's, `HeldOut.judge_sft`), then clipped
(`ppo.reward_clip`). With online labels the reward trainer publishes new reward models during
PPO, and each has its own offset and scale: a normalization measured once would drift away
from 0 and 1 with every refit. So the SFT samples are kept, and when a batch comes back
scored by a version the normalization was not measured for, the batch and the SFT samples
are scored again in one call (one version for both, even while the deployment swaps weights)
and the normalization is measured on that version.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlhf_ray.runtime.actors import retry_call


class ScoreNormalizer:
    def __init__(self, enabled: bool = True, clip: float | None = None):
        self.enabled, self.clip = enabled, clip
        self.mean, self.std = 0.0, 1.0
        self.version: int | None = None  # the reward model's version they were measured on
        self.prompts: list[str] = []  # the SFT samples they are measured on
        self.texts: list[str] = []
        self.finished: list[bool] = []
        self.remeasured = 0  # times measured again (a new reward-model version)

    def calibrate(self, prompts: list[str], texts: list[str], finished: list[bool],
                  raw: np.ndarray, version: int | None) -> None:
        """The reward model's raw scores of SFT samples (and the version that gave them)."""
        self.prompts, self.texts, self.finished = list(prompts), list(texts), list(finished)
        self._measure(np.asarray(raw, dtype=np.float64), version)

    def _measure(self, raw: np.ndarray, version: int | None) -> None:
        if self.enabled and len(raw) > 1:
            self.mean, self.std = float(raw.mean()), float(max(raw.std(), 1e-6))
        self.version = version

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        scores = (np.asarray(raw, dtype=np.float64) - self.mean) / self.std
        return np.clip(scores, -self.clip, self.clip) if self.clip else scores

    def score(self, rm_handle, prompts: list[str], texts: list[str],
              finished: list[bool] | None = None) -> tuple[dict, np.ndarray]:
        """The reward model's answer for a batch (`scores`, `version`) and the batch's
        normalized scores, under a normalization measured on the version that scored it.
        `finished`: whether each response ended or was cut at the length limit."""
        done = [True] * len(prompts) if finished is None else list(finished)
        scored = retry_call(lambda: rm_handle.score.remote(prompts, texts, finished=done))
        if (self.enabled and self.prompts and self.version is not None
                and scored.get("version") != self.version):
            both = retry_call(lambda: rm_handle.score.remote(
                prompts + self.prompts, texts + self.texts, finished=done + self.finished))
            raw = np.asarray(both["scores"], dtype=np.float64)
            self._measure(raw[len(prompts):], both.get("version"))
            self.remeasured += 1
            scored = {**both, "scores": list(raw[:len(prompts)])}
        return scored, self.normalize(np.asarray(scored["scores"], dtype=np.float64))

    def state(self) -> dict:
        return {"score_mean": self.mean, "score_std": self.std, "score_version": self.version}

    def restore(self, state: dict, sft_samples: Path | None = None) -> None:
        """A checkpoint's normalization; the SFT samples from the run's `samples_sft.jsonl`
        (without them a resumed run keeps the normalization it has, as before)."""
        self.mean, self.std = float(state["score_mean"]), float(state["score_std"])
        self.version = state.get("score_version")
        if sft_samples is not None and sft_samples.exists():
            rows = [json.loads(x) for x in sft_samples.read_text().splitlines() if x.strip()]
            self.prompts = [r["prompt"] for r in rows]
            self.texts = [r["response"] for r in rows]
            self.finished = [r.get("finished", True) for r in rows]
