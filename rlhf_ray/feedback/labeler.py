"""The labeler: one actor that owns the query queue and every write to the preference store.

The controller submits queries of the run's query kind (`queries.py`): pairs of segments
(control), or pairs or rankings of K responses to a prompt (language models). The labeler
makes what a query shows durable first (the kind writes its segments or texts, then the
query itself is written), queues it, and has it answered: by the synthetic oracle at once
(`source=oracle`), by humans through the labeling app (`source=human`), or by humans with the
oracle answering what they leave past a deadline (`source=mixed`). Each answer is durable in
the store before `answer` returns. The reward trainer receives every new label through
`drain`, so it never reads the store while training.

Humans see a query through a lease: a query handed to one labeler is not handed to another
until its lease expires, so several people can label at once. A query is offered only once
it is ready (clip pairs: both clips rendered, through `to_render` / `mark_ready` driven by
the clip renderers), so the page never waits on a render.

Reopening a store (a restarted actor, `rlhf-ray label RUN_DIR`) restores every acknowledged
answer and every query still pending.
"""

from __future__ import annotations

import itertools
import time
import uuid

import numpy as np

from rlhf_ray.feedback.queries import Answer, Query, QueryKind
from rlhf_ray.storage.store import MU, Label, PreferenceStore, QueryRecord

RENDER_RETRY_S = 120.0


def _ranking_key(order: list[int] | None) -> str:
    """How an answered ranking is remembered (and compared with a repeated answer)."""
    return "rank:skip" if order is None else "rank:" + ",".join(map(str, order))


class Labeler:
    def __init__(self, store_root: str, kind: QueryKind, source: str = "oracle", seed: int = 0,
                 budget: int | None = None, lease_s: float = 60.0, deadline_s: float = 120.0):
        if source not in ("oracle", "human", "mixed"):
            raise ValueError(f"labeler source {source!r}: must be oracle, human or mixed")
        self.store = PreferenceStore(store_root)
        self.kind = kind
        self.kind.open()
        self.source = source
        self.rng = np.random.default_rng(seed)
        self.budget = budget
        self.lease_s = lease_s
        self.deadline_s = deadline_s
        self.pending: dict[str, Query] = {}
        self.answered: dict[str, str] = {}  # query id -> label (a ranking: "rank:i,j,...")
        self._undrained: list[tuple[Label, Query]] = []
        self.by_source: dict[str, int] = {}
        # a new one per process: a controller that sees it change knows the actor restarted
        # (and lost its undrained labels, which the store still has)
        self.incarnation = uuid.uuid4().hex
        self._reopen()

    # ------------------------------------------------------------------ reopening
    def _reopen(self) -> None:
        rankings: dict[str, dict] = {}
        for row in self.store.labels().to_pylist():
            rid = row.get("ranking_id")
            if rid:
                r = rankings.setdefault(rid, {"wins": {}, "source": row["source"]})
                if row["label"] in ("left", "right"):
                    winner = row["left_id"] if row["label"] == "left" else row["right_id"]
                    r["wins"][winner] = r["wins"].get(winner, 0) + 1
                continue
            self.answered[row["query_id"]] = row["label"]
            self.by_source[row["source"]] = self.by_source.get(row["source"], 0) + 1
        queries = {r["query_id"]: r for r in self.store.queries().to_pylist()}
        for rid, r in rankings.items():
            items = queries[rid]["item_ids"] if rid in queries else sorted(r["wins"])
            order = sorted(range(len(items)), key=lambda i: -r["wins"].get(items[i], 0))
            self.answered[rid] = _ranking_key(order)
            self.by_source[r["source"]] = self.by_source.get(r["source"], 0) + 1
        pending = [q for q in self.store.pending_queries() if q.query_id not in self.answered]
        for q in self.kind.reopen(self.store, pending):
            self.pending[q.query_id] = q

    def _new_id(self) -> str:
        # from the OS, never from the seeded RNG: a restarted labeler (same seed) would
        # otherwise hand out the ids of queries already in the store, and reopening the
        # store (which deduplicates by id) would drop the newer labels
        return uuid.uuid4().hex

    # ------------------------------------------------------------------ asking
    def submit(self, *items, rm_version: int = 0) -> list[str]:
        """Queue the queries of `items` -- clip pairs: (left, right) segment batches, left[i]
        against right[i]; text: (prompts, responses per prompt) -- and return their ids."""
        queries = self.kind.new_queries(self.store, items, rm_version, self._new_id)
        self.store.write_queries([QueryRecord(q.query_id, q.kind, q.item_ids, q.created_at,
                                              q.rm_version) for q in queries])
        for q in queries:
            self.pending[q.query_id] = q
        ids = [q.query_id for q in queries]
        if self.source == "oracle":
            self.answer_with_oracle(ids)
        return ids

    # ------------------------------------------------------------------ the oracle
    def answer_with_oracle(self, query_ids: list[str]) -> int:
        """The synthetic teacher answers these pending queries; returns how many."""
        queries = [self.pending[q] for q in query_ids if q in self.pending]
        answers = self.kind.oracle_answers(queries, self.rng)
        choices = [(qid, a, "oracle") for qid, a in answers if isinstance(a, str)]
        if choices:  # one durable write for the batch
            self._record(choices)
        for qid, order in answers:
            if not isinstance(order, str):
                self._record_ranking(qid, order, "oracle")
        return len(answers)

    def expire_overdue(self, now: float | None = None) -> int:
        """`mixed`: the oracle answers what humans left pending past the deadline."""
        if self.source != "mixed":
            return 0
        now = time.time() if now is None else now
        late = [qid for qid, q in self.pending.items()
                if now - q.created_at > self.deadline_s and q.lease_until < now]
        return self.answer_with_oracle(late) if late else 0

    # ------------------------------------------------------------------ humans
    def lease_next(self, labeler_id: str, exclude: list[str] | tuple = (),
                   now: float | None = None) -> dict | None:
        """The oldest ready query nobody else holds, leased to `labeler_id`, with what the
        page shows of it; None if none. Queries this labeler already holds are offered again
        unless listed in `exclude`."""
        now = time.time() if now is None else now
        skip = set(exclude)
        for qid, q in self.pending.items():
            if not q.ready or qid in skip:
                continue
            if q.lease_holder not in (None, labeler_id) and q.lease_until > now:
                continue
            q.lease_holder, q.lease_until = labeler_id, now + self.lease_s
            return {"query_id": qid, "kind": q.kind, "item_ids": list(q.item_ids),
                    **self.kind.view(q)}
        return None

    def to_render(self, n: int = 4, now: float | None = None) -> list[tuple[str, object]]:
        """Queries whose items are not ready to show yet (clips to render), with their
        payloads; each handed out once per retry period."""
        now = time.time() if now is None else now
        out = []
        for qid, q in self.pending.items():
            if q.ready:
                continue
            if q.rendering_since is not None and now - q.rendering_since < RENDER_RETRY_S:
                continue
            q.rendering_since = now
            out.append((qid, q.payload))
            if len(out) >= n:
                break
        return out

    def mark_ready(self, query_ids: list[str]) -> None:
        for qid in query_ids:
            if qid in self.pending:
                self.pending[qid].ready = True

    def answer(self, query_id: str, answer: Answer, source: str) -> str:
        """Record one answer durably: a choice (left, right, equal, skip) for a comparison,
        an order (best first) or skip for a ranking of K. Returns 'stored', 'duplicate' (the
        same answer again), 'conflict' (a different answer for an answered query) or
        'unknown'."""
        order = None if isinstance(answer, str) else [int(i) for i in answer]
        if order is None and answer not in MU:
            raise ValueError(f"label {answer!r}: must be one of {', '.join(MU)}")
        if query_id in self.answered:
            prev = self.answered[query_id]
            if order is not None:
                same = prev == _ranking_key(order)
            else:
                same = prev == answer or (prev == "rank:skip" and answer == "skip")
            return "duplicate" if same else "conflict"
        q = self.pending.get(query_id)
        if q is None:
            return "unknown"
        ranking = self.kind.ranked(q)
        if order is not None and not ranking:
            raise ValueError(f"query {query_id} is a {q.kind} comparison: answer with a choice")
        if ranking and order is None and answer != "skip":
            raise ValueError(f"a ranking takes an order (or skip), not {answer!r}")
        if order is not None:
            k = len(q.item_ids)
            if sorted(order) != list(range(k)):
                raise ValueError(f"order {order}: must list each of the {k} responses "
                                 f"0..{k - 1} once")
        if ranking:
            self._record_ranking(query_id, order, source)
        else:
            self._record([(query_id, answer, source)])
        return "stored"

    # ------------------------------------------------------------------ recording
    def _record_ranking(self, qid: str, order: list[int] | None, source: str) -> None:
        """A ranking as its C(K,2) pairwise comparisons (one ranking id); skipped: one row,
        no pairs to train on."""
        q = self.pending[qid]
        now = time.time()
        if order is None:
            labs = [Label(qid, q.item_ids[0], q.item_ids[1], "skip", source, q.created_at, now,
                          q.rm_version, ranking_id=qid)]
        else:
            pos = {item: p for p, item in enumerate(order)}
            labs = [Label(f"{qid}/{i}-{j}", q.item_ids[i], q.item_ids[j],
                          "left" if pos[i] < pos[j] else "right", source, q.created_at, now,
                          q.rm_version, ranking_id=qid)
                    for i, j in itertools.combinations(range(len(q.item_ids)), 2)]
        self.store.append_labels(labs)  # durable before anything is acknowledged
        self.pending.pop(qid)
        self.answered[qid] = _ranking_key(order)
        self.by_source[source] = self.by_source.get(source, 0) + 1
        self._undrained += [(lab, q) for lab in labs]

    def _record(self, answers: list[tuple[str, str, str]]) -> list[Label]:
        now = time.time()
        labels = []
        for qid, label, source in answers:
            q = self.pending[qid]
            labels.append(Label(qid, q.item_ids[0], q.item_ids[1], label, source, q.created_at,
                                now, q.rm_version))
        self.store.append_labels(labels)  # durable before anything is acknowledged
        for lab in labels:
            q = self.pending.pop(lab.query_id)
            self.answered[lab.query_id] = lab.label
            self.by_source[lab.source] = self.by_source.get(lab.source, 0) + 1
            self._undrained.append((lab, q))
        return labels

    # ------------------------------------------------------------------ reading
    def drain(self):
        """New trainable comparisons since the last drain, in the reward trainer's form
        (skips are not trained on)."""
        items, self._undrained = self._undrained, []
        return self.kind.comparisons(items)

    def stored(self, clear_undrained: bool = False, page_labels: int | None = None):
        """Every trainable comparison already in the store (a reopened run's reward-model
        data set, or labels given with `rlhf-ray label`), in `drain` form, a page at a time
        (a Ray streaming generator: an Atari run's labels are gigabytes, so neither this
        actor nor the object store holds them all at once); at least one page. What this
        actor labels from now on arrives by `drain`. `clear_undrained`: also forget what
        `drain` would return (it is in the store: the caller is replacing its whole data set,
        after this actor restarted)."""
        if clear_undrained:
            self._undrained = []
        yield from self.kind.stored_pages(self.store, page_labels or self.kind.page_size)

    def stats(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        leased = sum(1 for q in self.pending.values() if q.lease_holder and q.lease_until > now)
        return {"labels_total": len(self.answered), "labels_pending": len(self.pending),
                "labels_leased": leased,
                "labels_ready": sum(1 for q in self.pending.values() if q.ready),
                "labels_by_source": dict(self.by_source), "budget": self.budget,
                "incarnation": self.incarnation}


# how the controllers start the labeler: restarted when its process dies (it reopens the
# store), and calls in flight then are retried -- `answer` is idempotent by query id
RESTART = {"max_restarts": -1, "max_task_retries": -1}
