"""The labeler: one actor that owns the query queue and every write to the preference store.

The controller submits queries -- pairs of segments (control), pairs of responses to a prompt or
rankings of K responses (language models). The labeler makes what a query shows durable first
(segments, texts, the query itself), queues it, and has it answered: by the synthetic oracle at
once (`source=oracle`), by humans through the labeling app (`source=human`), or by humans with
the oracle answering what they leave past a deadline (`source=mixed`). Each answer is durable in
the store before `answer` returns. The reward trainer receives every new label through `drain`,
so it never reads the store while training.

Humans see a query through a lease: a query handed to one labeler is not handed to another
until its lease expires, so several people can label at once. Clip queries are offered only
once both clips are rendered (`to_render` / `mark_ready`, driven by the clip renderer), so the
page never waits on a render.

Reopening a store (a restarted actor, `rlhf-ray label RUN_DIR`) restores every acknowledged
answer and every query still pending.
"""

from __future__ import annotations

import importlib
import itertools
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from rlhf_ray.core.comparisons import Comparisons
from rlhf_ray.core.oracle import SyntheticOracle
from rlhf_ray.core.segments import SegmentBatch
from rlhf_ray.store import MU, Label, PreferenceStore, QueryRecord

RENDER_RETRY_S = 120.0


@dataclass
class Query:
    query_id: str
    kind: str  # clip | text | ranking
    item_ids: list[str]
    created_at: float
    rm_version: int
    pair: SegmentBatch | None = None  # clip: the two segments
    prompt: str | None = None  # text / ranking
    responses: list[str] = field(default_factory=list)
    ready: bool = False
    rendering_since: float | None = None
    lease_holder: str | None = None
    lease_until: float = 0.0


def load_text_oracle(path: str, data_cfg: dict | None = None, what: str = "text oracle"):
    """`module:function` -> the callable scoring (prompt, response) -> float. A function
    marked `from_data_config` is a factory: called with the run's `data` section, it builds
    the oracle (one trained on its own split of a task's data). `what`: the setting's name
    in the error."""
    mod, _, fn = path.partition(":")
    if not mod or not fn:
        raise ValueError(f"{what} {path!r}: expected 'module:function'")
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{what} {path!r}: {exc}") from None
    return obj(data_cfg or {}) if getattr(obj, "from_data_config", False) else obj


class Labeler:
    def __init__(self, store_root: str, source: str = "oracle", oracle: dict | None = None,
                 seed: int = 0, budget: int | None = None, lease_s: float = 60.0,
                 deadline_s: float = 120.0, text_oracle: str | None = None,
                 oracle_data: dict | None = None):
        if source not in ("oracle", "human", "mixed"):
            raise ValueError(f"labeler source {source!r}: must be oracle, human or mixed")
        self.store = PreferenceStore(store_root)
        self.source = source
        self.oracle = SyntheticOracle(**(oracle or {}))
        self.text_oracle = load_text_oracle(text_oracle, oracle_data) if text_oracle else None
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
            self.answered[rid] = "rank:" + ",".join(map(str, order))
            self.by_source[r["source"]] = self.by_source.get(r["source"], 0) + 1
        pending = [q for q in self.store.pending_queries() if q.query_id not in self.answered]
        clip_ids = [i for q in pending if q.kind == "clip" for i in q.item_ids]
        segs = self.store.segments(clip_ids) if clip_ids else None
        text_ids = [i for q in pending if q.kind != "clip" for i in q.item_ids]
        texts = self.store.texts(text_ids) if text_ids else {}
        for q in pending:
            query = Query(q.query_id, q.kind, list(q.item_ids), q.created_at, q.rm_version)
            if q.kind == "clip":
                at = [clip_ids.index(i) for i in q.item_ids]
                query.pair = segs.take(at)
                query.ready = all(self.store.has_clip(i) for i in q.item_ids)
            else:
                query.prompt = texts[q.item_ids[0]][0]
                query.responses = [texts[i][1] for i in q.item_ids]
                query.ready = True
            self.pending[q.query_id] = query

    def _new_id(self) -> str:
        # from the OS, never from the seeded RNG: a restarted labeler (same seed) would
        # otherwise hand out the ids of queries already in the store, and reopening the
        # store (which deduplicates by id) would drop the newer labels
        return uuid.uuid4().hex

    # ------------------------------------------------------------------ asking
    def submit(self, left: SegmentBatch, right: SegmentBatch, rm_version: int = 0) -> list[str]:
        """Queue len(left) clip queries comparing left[i] with right[i]; returns their ids."""
        if len(left) != len(right):
            raise ValueError(f"{len(left)} left segments but {len(right)} right segments")
        both = SegmentBatch.concat([left, right])
        self.store.write_segments(both)  # segments are durable before any label cites them
        now = time.time()
        queries = []
        for i in range(len(left)):
            pair = both.take([i, len(left) + i])
            queries.append(Query(self._new_id(), "clip", list(pair.ids), now, rm_version, pair=pair))
        return self._enqueue(queries)

    def submit_texts(self, prompts: list[str], responses: list[list[str]],
                     rm_version: int = 0) -> list[str]:
        """Queue one query per prompt: 2 responses -> a comparison, K > 2 -> a ranking."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
        ids, ps, rs, queries = [], [], [], []
        now = time.time()
        for prompt, resp in zip(prompts, responses):
            if not 2 <= len(resp) <= 9:
                raise ValueError(f"{len(resp)} responses for a prompt: must be 2 to 9")
            tids = [self._new_id() for _ in resp]
            ids += tids
            ps += [prompt] * len(resp)
            rs += list(resp)
            queries.append(Query(self._new_id(), "text" if len(resp) == 2 else "ranking", tids,
                                 now, rm_version, prompt=prompt, responses=list(resp), ready=True))
        self.store.write_texts(ids, ps, rs)
        return self._enqueue(queries)

    def _enqueue(self, queries: list[Query]) -> list[str]:
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
        clips = [q for q in query_ids if q in self.pending and self.pending[q].kind == "clip"]
        texts = [q for q in query_ids if q in self.pending and self.pending[q].kind != "clip"]
        answers: list[tuple[str, str, str]] = []
        if clips:
            pairs = [self.pending[q].pair for q in clips]
            rl = np.stack([p.arrays["true_rewards"][0] for p in pairs])
            rr = np.stack([p.arrays["true_rewards"][1] for p in pairs])
            answers += [(q, a, "oracle") for q, a in zip(clips, self.oracle.label(rl, rr, self.rng))]
        n = len(self._record(answers)) if answers else 0
        if texts and self.text_oracle is not None:
            for qid in texts:
                q = self.pending[qid]
                scores = np.array([float(self.text_oracle(q.prompt, r)) for r in q.responses])
                if q.kind == "text":
                    label = "equal" if scores[0] == scores[1] else ("left" if scores[0] > scores[1] else "right")
                    self._record([(qid, label, "oracle")])
                else:
                    self._record_ranking(qid, list(np.argsort(-scores, kind="stable")), "oracle")
                n += 1
        return n

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
        """The oldest ready query nobody else holds, leased to `labeler_id`; None if none.
        Queries this labeler already holds are offered again unless listed in `exclude`."""
        now = time.time() if now is None else now
        skip = set(exclude)
        for qid, q in self.pending.items():
            if not q.ready or qid in skip:
                continue
            if q.lease_holder not in (None, labeler_id) and q.lease_until > now:
                continue
            q.lease_holder, q.lease_until = labeler_id, now + self.lease_s
            out = {"query_id": qid, "kind": q.kind, "item_ids": list(q.item_ids)}
            if q.kind != "clip":
                out.update(prompt=q.prompt, responses=list(q.responses))
            return out
        return None

    def to_render(self, n: int = 4, now: float | None = None) -> list[tuple[str, SegmentBatch]]:
        """Clip queries whose clips are not rendered yet (handed out once per retry period)."""
        now = time.time() if now is None else now
        out = []
        for qid, q in self.pending.items():
            if q.kind != "clip" or q.ready:
                continue
            if q.rendering_since is not None and now - q.rendering_since < RENDER_RETRY_S:
                continue
            q.rendering_since = now
            out.append((qid, q.pair))
            if len(out) >= n:
                break
        return out

    def mark_ready(self, query_ids: list[str]) -> None:
        for qid in query_ids:
            if qid in self.pending:
                self.pending[qid].ready = True

    def answer(self, query_id: str, label: str, source: str) -> str:
        """Record one answer durably. Returns 'stored', 'duplicate' (same answer again),
        'conflict' (a different answer for an answered query) or 'unknown'."""
        if label not in MU:
            raise ValueError(f"label {label!r}: must be one of {', '.join(MU)}")
        if query_id in self.answered:
            prev = self.answered[query_id]
            same = prev == label or (prev == "rank:skip" and label == "skip")
            return "duplicate" if same else "conflict"
        if query_id not in self.pending:
            return "unknown"
        if self.pending[query_id].kind == "ranking":
            if label != "skip":
                raise ValueError(f"a ranking takes an order (or skip), not {label!r}")
            self._record_ranking(query_id, None, source)
            return "stored"
        self._record([(query_id, label, source)])
        return "stored"

    def answer_ranking(self, query_id: str, order: list[int], source: str) -> str:
        """Record a ranking, best first, as its C(K,2) pairwise comparisons (one ranking id).
        Returns like `answer`."""
        q = self.pending.get(query_id)
        if query_id in self.answered:
            return "duplicate" if self.answered[query_id] == "rank:" + ",".join(map(str, order)) else "conflict"
        if q is None:
            return "unknown"
        if q.kind != "ranking":
            raise ValueError(f"query {query_id} is a {q.kind} comparison: answer with a choice")
        k = len(q.item_ids)
        if sorted(order) != list(range(k)):
            raise ValueError(f"order {order}: must list each of the {k} responses 0..{k - 1} once")
        self._record_ranking(query_id, order, source)
        return "stored"

    # ------------------------------------------------------------------ recording
    def _record_ranking(self, qid: str, order: list[int] | None, source: str) -> None:
        q = self.pending[qid]
        now = time.time()
        if order is None:  # skipped: one row, no pairs to train on
            labs = [Label(qid, q.item_ids[0], q.item_ids[1], "skip", source, q.created_at, now,
                          q.rm_version, ranking_id=qid)]
            key = "rank:skip"
        else:
            pos = {item: p for p, item in enumerate(order)}
            labs = [Label(f"{qid}/{i}-{j}", q.item_ids[i], q.item_ids[j],
                          "left" if pos[i] < pos[j] else "right", source, q.created_at, now,
                          q.rm_version, ranking_id=qid)
                    for i, j in itertools.combinations(range(len(q.item_ids)), 2)]
            key = "rank:" + ",".join(map(str, order))
        self.store.append_labels(labs)  # durable before anything is acknowledged
        self.pending.pop(qid)
        self.answered[qid] = key
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
    def drain(self) -> Comparisons | None:
        """New trainable clip comparisons since the last drain (skips are not trained on)."""
        items = [(lab, q) for lab, q in self._undrained
                 if q.kind == "clip" and MU[lab.label] is not None]
        self._undrained = [(lab, q) for lab, q in self._undrained if q.kind != "clip"]
        if not items:
            return None
        obs = np.stack([q.pair.arrays["obs"] for _, q in items])  # [P, 2, k, ...]
        act = np.stack([q.pair.arrays["actions"] for _, q in items])
        mu = np.array([MU[lab.label] for lab, _ in items], dtype=np.float32)
        return Comparisons(obs[:, 0], act[:, 0], obs[:, 1], act[:, 1], mu)

    def drain_texts(self) -> list[dict]:
        """New trainable text comparisons: prompt, left, right, mu, ranking_id (a ranking's
        pairs share it, so the reward-model loss can batch them together)."""
        out, keep = [], []
        for lab, q in self._undrained:
            if q.kind == "clip":
                keep.append((lab, q))
                continue
            if MU[lab.label] is None:
                continue
            i, j = q.item_ids.index(lab.left_id), q.item_ids.index(lab.right_id)
            out.append({"prompt": q.prompt, "left": q.responses[i], "right": q.responses[j],
                        "mu": MU[lab.label], "ranking_id": lab.ranking_id})
        self._undrained = keep
        return out

    def stored_comparisons(self, clear_undrained: bool = False, page_labels: int = 256):
        """Every trainable clip comparison already in the store (a resumed run's reward-model
        data set), in `drain` form, yielded `page_labels` at a time (a Ray streaming
        generator: the labels of an Atari run are gigabytes, so neither this actor nor the
        object store holds them all at once); what this actor labels from now on arrives by
        `drain`. `clear_undrained`: also forget what `drain` would return (it is in the
        store: the caller is replacing its whole data set, after this actor restarted)."""
        if clear_undrained:
            self._undrained = [(lab, q) for lab, q in self._undrained if q.kind != "clip"]
        clip = {r["query_id"] for r in self.store.queries().to_pylist() if r["kind"] == "clip"}
        rows = [r for r in self.store.labels().to_pylist()
                if MU.get(r["label"]) is not None and r["query_id"] in clip]
        for s in range(0, len(rows), page_labels):
            page = rows[s:s + page_labels]
            segs = self.store.segments(sorted({i for r in page
                                               for i in (r["left_id"], r["right_id"])}))
            at = {sid: i for i, sid in enumerate(segs.ids)}
            left = [at[r["left_id"]] for r in page]
            right = [at[r["right_id"]] for r in page]
            obs, act = segs.arrays["obs"], segs.arrays["actions"]
            mu = np.array([MU[r["label"]] for r in page], dtype=np.float32)
            yield Comparisons(obs[left], act[left], obs[right], act[right], mu)

    def stored_text_comparisons(self, clear_undrained: bool = False) -> list[dict]:
        """Every trainable text comparison already in the store (a reopened run, or labels
        given with `rlhf-ray label`), in `drain_texts` form; what this actor labels from now
        on arrives through `drain_texts` instead. `clear_undrained`: as in
        `stored_comparisons`, for text queries."""
        if clear_undrained:
            self._undrained = [(lab, q) for lab, q in self._undrained if q.kind == "clip"]
        text_ids = {i for q in self.store.queries().to_pylist() if q["kind"] != "clip"
                    for i in q["item_ids"]}
        rows = [r for r in self.store.labels().to_pylist()
                if MU.get(r["label"]) is not None and r["left_id"] in text_ids]
        texts = self.store.texts(sorted({i for r in rows for i in (r["left_id"], r["right_id"])}))
        out = []
        for r in rows:
            prompt, left = texts[r["left_id"]]
            out.append({"prompt": prompt, "left": left, "right": texts[r["right_id"]][1],
                        "mu": MU[r["label"]], "ranking_id": r.get("ranking_id") or r["query_id"]})
        return out

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

