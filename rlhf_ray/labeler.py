"""The labeler: one actor that owns the query queue and every write to the preference store.

The controller submits queries (pairs of segments); the labeler makes the segments durable,
queues the queries and has them answered -- by the synthetic oracle at once (this module), or
by humans in the browser (the labeling app plugs in behind the same `answer`). Each answer is
durable in the store before `answer` returns. The reward trainer receives every new label
through `drain`, so it never reads the store while training.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import numpy as np

from rlhf_ray.core.oracle import SyntheticOracle
from rlhf_ray.core.segments import SegmentBatch
from rlhf_ray.reward_trainer import Comparisons
from rlhf_ray.store import MU, Label, PreferenceStore


@dataclass
class Query:
    query_id: str
    left: int  # row in the pending segment batch
    right: int
    created_at: float
    rm_version: int


class Labeler:
    def __init__(self, store_root: str, source: str = "oracle", oracle: dict | None = None,
                 seed: int = 0):
        self.store = PreferenceStore(store_root)
        self.source = source
        self.oracle = SyntheticOracle(**(oracle or {}))
        self.rng = np.random.default_rng(seed)
        self.pending: dict[str, tuple[Query, SegmentBatch]] = {}
        self.answered: dict[str, str] = {}  # query id -> label
        self._undrained: list[tuple[Label, SegmentBatch]] = []
        self.by_source: dict[str, int] = {}
        for row in self.store.labels().to_pylist():  # reopen: every acknowledged label counts
            self.answered[row["query_id"]] = row["label"]
            self.by_source[row["source"]] = self.by_source.get(row["source"], 0) + 1

    def submit(self, left: SegmentBatch, right: SegmentBatch, rm_version: int = 0) -> list[str]:
        """Queue len(left) queries comparing left[i] with right[i]; returns their ids."""
        if len(left) != len(right):
            raise ValueError(f"{len(left)} left segments but {len(right)} right segments")
        both = SegmentBatch.concat([left, right])
        self.store.write_segments(both)  # segments are durable before any label cites them
        now = time.time()
        ids = []
        for i in range(len(left)):
            qid = uuid.UUID(bytes=self.rng.bytes(16), version=4).hex
            pair = both.take([i, len(left) + i])
            self.pending[qid] = (Query(qid, 0, 1, now, rm_version), pair)
            ids.append(qid)
        if self.source == "oracle":
            self.answer_with_oracle(ids)
        return ids

    def answer_with_oracle(self, query_ids: list[str]) -> int:
        qs = [q for q in query_ids if q in self.pending]
        if not qs:
            return 0
        pairs = [self.pending[q][1] for q in qs]
        rl = np.stack([p.arrays["true_rewards"][0] for p in pairs])
        rr = np.stack([p.arrays["true_rewards"][1] for p in pairs])
        answers = self.oracle.label(rl, rr, self.rng)
        return len(self._record([(q, a, "oracle") for q, a in zip(qs, answers)]))

    def answer(self, query_id: str, label: str, source: str) -> str:
        """Record one answer durably. Returns 'stored', 'duplicate' (same answer again),
        'conflict' (a different answer for an answered query) or 'unknown'."""
        if label not in MU:
            raise ValueError(f"label {label!r}: must be one of {', '.join(MU)}")
        if query_id in self.answered:
            return "duplicate" if self.answered[query_id] == label else "conflict"
        if query_id not in self.pending:
            return "unknown"
        self._record([(query_id, label, source)])
        return "stored"

    def _record(self, answers: list[tuple[str, str, str]]) -> list[Label]:
        now = time.time()
        labels = []
        for qid, label, source in answers:
            q, pair = self.pending[qid]
            labels.append(Label(qid, pair.ids[0], pair.ids[1], label, source, q.created_at, now,
                                q.rm_version))
        self.store.append_labels(labels)  # durable before anything is acknowledged
        for lab in labels:
            _, pair = self.pending.pop(lab.query_id)
            self.answered[lab.query_id] = lab.label
            self.by_source[lab.source] = self.by_source.get(lab.source, 0) + 1
            self._undrained.append((lab, pair))
        return labels

    def drain(self) -> Comparisons | None:
        """New trainable comparisons since the last drain (skips are not trained on)."""
        items = [(lab, pair) for lab, pair in self._undrained if MU[lab.label] is not None]
        self._undrained = []
        if not items:
            return None
        obs = np.stack([p.arrays["obs"] for _, p in items])  # [P, 2, k, ...]
        act = np.stack([p.arrays["actions"] for _, p in items])
        mu = np.array([MU[lab.label] for lab, _ in items], dtype=np.float32)
        return Comparisons(obs[:, 0], act[:, 0], obs[:, 1], act[:, 1], mu)

    def stats(self) -> dict:
        return {"labels_total": len(self.answered), "labels_pending": len(self.pending),
                "labels_by_source": dict(self.by_source)}
