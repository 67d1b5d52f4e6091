"""Fitting the reward-predictor ensemble to comparisons (Christiano et al. 2017, 2.2.3).

Each member trains on its own bootstrap of the comparisons. The bootstrap is online: every
comparison gets a Poisson(1) count per member (Oza & Russell's online bagging), and the
comparisons a member drew zero times -- a fraction 1/e, exactly the paper's held-out share --
are that member's validation set. The loss is the Bradley-Terry cross-entropy with the 10%
random-response model; the L2 coefficient of each member adapts to keep its validation loss
within [1.1, 1.5] x its training loss. After each round every member's output is re-normalized.

`RewardTrainer` is a plain class; the wiring (`runtime.actors.remote_role`) makes it an actor so
reward-model training overlaps rollouts as in the paper, and publishes its weights.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from rlhf_ray.control.config import RewardModelConfig
from rlhf_ray.control.reward import RewardEnsemble, RewardNetSpec, as_tensors
from rlhf_ray.core.bradley_terry import adapt_l2, bradley_terry_loss
from rlhf_ray.core.comparisons import Comparisons, ComparisonSet
from rlhf_ray.runtime.actors import torch_threads
from rlhf_ray.storage.weights import Publishes


class RewardTrainer(Publishes):
    def __init__(self, spec: RewardNetSpec, cfg: RewardModelConfig, seed: int = 0,
                 torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.spec, self.cfg = spec, cfg
        self.rng = np.random.default_rng(seed)
        self.ensemble = RewardEnsemble(spec, seed=seed)
        self.opts = [torch.optim.Adam(m.parameters(), lr=cfg.lr) for m in self.ensemble.members]
        self.l2 = [cfg.l2] * spec.ensemble_size
        self.version = 0
        self._set = ComparisonSet()
        self._dropped = 0  # the oldest labels, let go once past the label buffer
        self._counts = np.zeros((spec.ensemble_size, 0), dtype=np.int64)  # bootstrap counts
        self.last_stats: dict = {}

    # ------------------------------------------------------------------ data
    def add(self, comparisons: Comparisons | None) -> int:
        """Take these comparisons (a copy: the arguments may live in Ray's object store);
        returns how many labels this trainer has had."""
        if comparisons is None:
            return self.num_labels
        keep = ~np.isnan(comparisons.mu)  # "can't tell" (skip) is never trained on
        if keep.any():
            self._set.append(Comparisons(
                comparisons.left_obs[keep], comparisons.left_act[keep],
                comparisons.right_obs[keep], comparisons.right_act[keep],
                comparisons.mu[keep].astype(np.float32)))
            new = self.rng.poisson(1.0, size=(self.spec.ensemble_size, int(keep.sum())))
            self._counts = np.concatenate([self._counts, new], axis=1)
            if self.cfg.label_buffer:  # labels past the buffer never train again: let go
                gone = self._set.drop_before(len(self._set) - self.cfg.label_buffer)
                self._counts, self._dropped = self._counts[:, gone:], self._dropped + gone
        return self.num_labels

    def replace(self, comparisons: Comparisons | None) -> int:
        """Drop every comparison and add these (the labeler restarted: the store is the
        whole data set, which may follow in more `add`s); bootstrap counts are drawn
        afresh."""
        self._set, self._dropped = ComparisonSet(), 0
        self._counts = np.zeros((self.spec.ensemble_size, 0), dtype=np.int64)
        return self.add(comparisons)

    @property
    def num_labels(self) -> int:
        """Labels had in all, the ones already past the label buffer included."""
        return self._dropped + len(self._set)

    # ------------------------------------------------------------------ training
    def _returns(self, k: int, obs: np.ndarray, act: np.ndarray) -> torch.Tensor:
        """Summed raw rewards of member k over each segment: [B]."""
        b, t = obs.shape[:2]
        o, a = as_tensors(obs.reshape(b * t, *obs.shape[2:]), act.reshape(b * t, *act.shape[2:]))
        return self.ensemble.raw_member(k, o, a).reshape(b, t).sum(dim=1)

    def _loss(self, k: int, idx: np.ndarray) -> tuple[torch.Tensor, float]:
        b = len(idx)
        # left and right segments in one forward pass: half the kernel launches of two
        obs, act, mu = self._set.pairs(idx)
        both = self._returns(k, obs, act)
        r1, r2 = both[:b], both[b:]
        mu = torch.from_numpy(mu)
        loss = bradley_terry_loss(r1, r2, mu, self.cfg.random_response_prob)
        decided = mu != 0.5
        correct = ((r1 > r2) == (mu > 0.5))[decided].float()
        acc = float(correct.mean()) if decided.any() else float("nan")
        return loss, acc

    @torch.no_grad()
    def _evaluate(self, k: int, idx: np.ndarray, mu: np.ndarray) -> tuple[float, float]:
        """Member k's loss and accuracy (on decided comparisons) over every row of `idx`, in
        chunks: the L2 rule and the reported accuracy see the newest labels as well as the
        oldest. A chunk's frames, as floats, stay near 256 MB (1024 MuJoCo pairs; about 45
        Atari ones)."""
        if len(idx) == 0:
            return float("nan"), float("nan")
        per_pair = 2 * 4 * self._set.segment_values  # both segments' frames as float32
        chunk = int(np.clip(2 ** 28 // per_pair, 8, 1024))
        loss_sum, correct, decided = 0.0, 0.0, 0
        for s in range(0, len(idx), chunk):
            part = idx[s:s + chunk]
            loss, acc = self._loss(k, part)
            loss_sum += float(loss) * len(part)
            n = int((mu[part] != 0.5).sum())
            if n:
                correct, decided = correct + acc * n, decided + n
        return loss_sum / len(idx), (correct / decided if decided else float("nan"))

    def train(self, steps: int | None = None, threads: int | None = None) -> dict:
        """One round: `steps` gradient steps per member, then L2 adaptation and normalization.
        `threads`: torch threads for this call only (the pretraining runs alone; 0: this
        node's cores)."""
        if threads is not None:
            with torch_threads(threads):
                return self.train(steps)
        if self.num_labels == 0:
            return {"rm_num_labels": 0}
        t0 = time.time()
        steps = self.cfg.steps_per_round if steps is None else steps
        if self.cfg.normalize_inputs:
            # inputs standardized over the labelled transitions; a trained ensemble keeps
            # its function through the change (only the round's training moves it)
            if self.ensemble.fit_input_normalizer(*self._transitions(), preserve=self.version > 0):
                for opt, member in zip(self.opts, self.ensemble.members):
                    for param in member.body[0].parameters():  # moments of the old scale
                        opt.state.pop(param, None)
        stats = {"train_loss": [], "val_loss": [], "val_acc": [], "train_acc": []}
        self.ensemble.train()
        # the paper's Atari label buffer: only the most recent labels train and validate
        held, mu = len(self._set), self._set.mu
        oldest = max(0, held - (self.cfg.label_buffer or held))
        for k, member in enumerate(self.ensemble.members):
            weights = self._counts[k].astype(np.float64)
            weights[:oldest] = 0.0
            train_idx = np.flatnonzero(weights > 0)
            val_idx = oldest + np.flatnonzero(weights[oldest:] == 0)
            if len(train_idx) == 0:
                train_idx = np.arange(oldest, held)
                weights = np.ones(held)
            p = weights[train_idx] / weights[train_idx].sum()
            params = [w for n, w in member.named_parameters() if n.endswith("weight")]
            for _ in range(steps):
                idx = self.rng.choice(train_idx, size=min(self.cfg.batch_size, 4 * len(train_idx)),
                                      p=p)
                loss, _ = self._loss(k, idx)
                l2 = sum((w ** 2).sum() for w in params)
                self.opts[k].zero_grad()
                (loss + self.l2[k] * l2).backward()
                self.opts[k].step()
            member.eval()
            tl, ta = self._evaluate(k, train_idx, mu)
            vl, va = self._evaluate(k, val_idx, mu)
            member.train()
            if self.cfg.adapt_l2 and np.isfinite(vl):
                lo, hi = self.cfg.val_loss_ratio
                self.l2[k] = adapt_l2(self.l2[k], float(tl), vl, lo, hi)
            stats["train_loss"].append(float(tl))
            stats["val_loss"].append(vl)
            stats["val_acc"].append(va)
            stats["train_acc"].append(ta)
        self.ensemble.eval()
        self.ensemble.fit_normalizers(*self._transitions())
        self.version += 1
        self.last_stats = {
            "rm_version": self.version,
            "rm_num_labels": self.num_labels,
            "rm_labels_in_buffer": held - oldest,
            "rm_train_loss": float(np.mean(stats["train_loss"])),
            "rm_val_loss": float(np.nanmean(stats["val_loss"])) if np.isfinite(stats["val_loss"]).any() else float("nan"),
            "rm_val_accuracy": float(np.nanmean(stats["val_acc"])) if np.isfinite(stats["val_acc"]).any() else float("nan"),
            "rm_train_accuracy": float(np.nanmean(stats["train_acc"])),
            "rm_l2_mean": float(np.mean(self.l2)),
            "rm_train_s": time.time() - t0,
        }
        return self.last_stats

    def _transitions(self, max_transitions: int = 20_000):
        """A sample of the labelled segments' transitions, as tensors (only the sampled ones
        are gathered)."""
        total = 2 * len(self._set) * self._set.segment_len
        flat = (self.rng.choice(total, size=max_transitions, replace=False)
                if total > max_transitions else None)
        return as_tensors(*self._set.transitions(flat))

    # ------------------------------------------------------------------ weights / state
    def weights(self) -> tuple[int, dict[str, np.ndarray]]:
        return self.version, {k: v.numpy() for k, v in self.ensemble.flat_state().items()}

    def restore(self, weights: dict, state: dict) -> int:
        """A checkpoint's ensemble (weights and output normalizers), version, L2 coefficients
        and RNG. The comparisons come back from the store (`add`); their bootstrap counts are
        drawn afresh."""
        self.ensemble.load_flat_state(weights)
        self.ensemble.eval()
        self.version = int(state["version"])
        self.l2 = [float(x) for x in state["l2"]]
        self.last_stats = dict(state.get("last_stats") or {})
        self.rng.bit_generator.state = state["rng"]
        return self.version

    def state(self) -> dict:
        """Everything a resumed run needs besides the comparisons themselves (in the store)."""
        return {"version": self.version, "l2": list(self.l2), "last_stats": self.last_stats,
                "rng": self.rng.bit_generator.state}
