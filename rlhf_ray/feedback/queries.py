"""Query kinds: what the labeler asks, behind one interface (imitation's `Fragmenter` and
`PreferenceGatherer` are pieces passed in, not chosen by `if`).

A query kind makes the items a query shows durable and builds its queries (`new_queries`),
rebuilds the pending ones when the store is reopened (`reopen`), says what the page shows
(`view`) and how a synthetic teacher answers (`oracle_answers`), and turns answered queries
into the reward trainer's data (`comparisons`, `stored_pages`). The labeler owns the queue,
leases and durability and never asks which kind it holds.

- `ClipPairs`: two trajectory segments side by side (Christiano et al. 2017), answered left,
  right, equal or skip; the oracle is a B-Pref teacher on the segments' true returns.
- `TextRankings`: K responses to one prompt (InstructGPT), K = 2 a comparison ("text"), K > 2
  a ranking answered by an order, stored as its C(K,2) pairwise comparisons.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from rlhf_ray.core.comparisons import Comparisons
from rlhf_ray.core.oracle import SyntheticOracle
from rlhf_ray.core.segments import SegmentBatch
from rlhf_ray.storage.store import MU, Label, PreferenceStore, QueryRecord

Answer = str | list[int]  # a choice (left, right, equal, skip) or an order, best first


@dataclass
class Query:
    query_id: str
    kind: str  # as the store records it: clip | text | ranking
    item_ids: list[str]
    created_at: float
    rm_version: int
    payload: Any = None  # clip: the two segments (a SegmentBatch); text: (prompt,
    # responses, finished: whether the policy ended each)
    ready: bool = False  # its items can be shown (a clip pair: both clips rendered)
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


class QueryKind:
    """The interface the labeler calls. A kind is built where the run is wired (it is
    pickled to the labeler's process) and `open()`ed there."""

    page_size: int | None = None  # `stored_pages`: labels per page (None: the kind's own)
    empty: Any = None  # an empty set of comparisons in the trainer's form

    def open(self) -> None:
        """In the labeler's process, before the first query: load what answering needs."""

    def new_queries(self, store: PreferenceStore, items: tuple, rm_version: int,
                    new_id: Callable[[], str]) -> list[Query]:
        """Queries for `items` (the arguments of `Labeler.submit`), their items durable in
        the store first."""
        raise NotImplementedError

    def reopen(self, store: PreferenceStore, records: list[QueryRecord]) -> list[Query]:
        """The pending queries `records`, with their items read back from the store."""
        raise NotImplementedError

    def view(self, q: Query) -> dict:
        """What the page shows of a leased query."""
        raise NotImplementedError

    def ranked(self, q: Query) -> bool:
        """Whether `q` is answered by an order of its items (else by a choice)."""
        return False

    def oracle_answers(self, queries: list[Query], rng: np.random.Generator
                       ) -> list[tuple[str, Answer]]:
        """The synthetic teacher's answers; a kind without a teacher answers nothing."""
        return []

    def comparisons(self, answered: list[tuple[Label, Query]]):
        """New trainable comparisons (skips are never trained on) in the trainer's form; an
        empty set when none."""
        raise NotImplementedError

    def stored_pages(self, store: PreferenceStore, page_labels: int | None) -> Iterator:
        """Every trainable comparison in the store, in the trainer's form, page by page;
        at least one page (an empty one when there is none)."""
        raise NotImplementedError


def _two_lists(items: tuple, call: str, first: str, second: str) -> tuple:
    """The two equally long lists `Labeler.submit(*items)` takes; one line naming what is
    wrong otherwise (`call`: the kind's submit, `first`/`second`: what the lists hold)."""
    if len(items) != 2:
        raise ValueError(f"{call}, not {len(items)} item lists")
    a, b = items
    if len(a) != len(b):
        raise ValueError(f"{len(a)} {first} but {len(b)} {second}")
    return a, b


def _trainable_rows(store: PreferenceStore, kinds: set[str]) -> list[dict]:
    """The store's label rows with a trainable answer, of queries of these kinds."""
    ids = {r["query_id"] for r in store.queries().to_pylist() if r["kind"] in kinds}
    return [r for r in store.labels().to_pylist()
            if MU.get(r["label"]) is not None and (r.get("ranking_id") or r["query_id"]) in ids]


# --------------------------------------------------------------------------- clip pairs


@dataclass
class ClipPairs(QueryKind):
    """Pairs of trajectory segments. `oracle`: the `SyntheticOracle` settings (B-Pref)."""

    oracle: dict = field(default_factory=dict)
    page_size: int | None = 256  # an Atari run's labels are gigabytes: never all at once

    def open(self) -> None:
        self._teacher = SyntheticOracle(**self.oracle)

    def new_queries(self, store, items, rm_version, new_id):
        left, right = _two_lists(items, "clip pairs: submit(left, right)", "left segments",
                                 "right segments")
        both = SegmentBatch.concat([left, right])
        store.write_segments(both)  # segments are durable before any label cites them
        now = time.time()
        out = []
        for i in range(len(left)):
            pair = both.take([i, len(left) + i])
            out.append(Query(new_id(), "clip", list(pair.ids), now, rm_version, payload=pair))
        return out

    def reopen(self, store, records):
        ids = [i for q in records for i in q.item_ids]
        segs = store.segments(ids) if ids else None
        out = []
        for q in records:
            pair = segs.take([ids.index(i) for i in q.item_ids])
            out.append(Query(q.query_id, q.kind, list(q.item_ids), q.created_at, q.rm_version,
                             payload=pair, ready=all(store.has_clip(i) for i in q.item_ids)))
        return out

    def view(self, q):
        left, right = (f"clips/{i}.webm" for i in q.item_ids)
        return {"left": left, "right": right}

    def oracle_answers(self, queries, rng):
        if not queries:
            return []
        rl = np.stack([q.payload.arrays["true_rewards"][0] for q in queries])
        rr = np.stack([q.payload.arrays["true_rewards"][1] for q in queries])
        return list(zip([q.query_id for q in queries], self._teacher.label(rl, rr, rng)))

    def comparisons(self, answered):
        items = [(lab, q) for lab, q in answered if MU[lab.label] is not None]
        if not items:
            return None
        obs = np.stack([q.payload.arrays["obs"] for _, q in items])  # [P, 2, k, ...]
        act = np.stack([q.payload.arrays["actions"] for _, q in items])
        mu = np.array([MU[lab.label] for lab, _ in items], dtype=np.float32)
        return Comparisons(obs[:, 0], act[:, 0], obs[:, 1], act[:, 1], mu)

    def stored_pages(self, store, page_labels):
        rows = _trainable_rows(store, {"clip"})
        if not rows:
            yield None
        for s in range(0, len(rows), page_labels):
            page = rows[s:s + page_labels]
            segs = store.segments(sorted({i for r in page for i in (r["left_id"], r["right_id"])}))
            at = {sid: i for i, sid in enumerate(segs.ids)}
            left = [at[r["left_id"]] for r in page]
            right = [at[r["right_id"]] for r in page]
            obs, act = segs.arrays["obs"], segs.arrays["actions"]
            mu = np.array([MU[r["label"]] for r in page], dtype=np.float32)
            yield Comparisons(obs[left], act[left], obs[right], act[right], mu)


# --------------------------------------------------------------------------- text rankings


@dataclass
class TextRankings(QueryKind):
    """K responses to a prompt. `oracle`: `module:function` scoring (prompt, response)
    (None: no teacher); `data`: the run's `data` section, for an oracle built from it."""

    oracle: str | None = None
    data: dict | None = None
    empty = ()  # (a class attribute, not a field)

    def open(self) -> None:
        self._teacher = load_text_oracle(self.oracle, self.data) if self.oracle else None

    def new_queries(self, store, items, rm_version, new_id):
        """items: (prompts, response lists) or (prompts, response lists, finished lists:
        whether the policy ended each response or it was cut at the length limit; kept with
        the text so the reward model reads a cut one without an EOS)."""
        finished = items[2] if len(items) == 3 else None
        prompts, responses = _two_lists(items[:2] if finished is not None else items,
                                        "text: submit(prompts, responses[, finished])",
                                        "prompts", "response lists")
        if finished is not None and [len(f) for f in finished] != [len(r) for r in responses]:
            raise ValueError("finished: one list of flags per prompt, one flag per response")
        ids, ps, rs, fs, out = [], [], [], [], []
        now = time.time()
        for n, (prompt, resp) in enumerate(zip(prompts, responses)):
            if not 2 <= len(resp) <= 9:
                raise ValueError(f"{len(resp)} responses for a prompt: must be 2 to 9")
            ended = [True] * len(resp) if finished is None else [bool(f) for f in finished[n]]
            tids = [new_id() for _ in resp]
            ids += tids
            ps += [prompt] * len(resp)
            rs += list(resp)
            fs += ended
            out.append(Query(new_id(), "text" if len(resp) == 2 else "ranking", tids, now,
                             rm_version, payload=(prompt, list(resp), ended), ready=True))
        store.write_texts(ids, ps, rs, fs)
        return out

    def reopen(self, store, records):
        texts = store.texts([i for q in records for i in q.item_ids]) if records else {}
        return [Query(q.query_id, q.kind, list(q.item_ids), q.created_at, q.rm_version,
                      payload=(texts[q.item_ids[0]][0], [texts[i][1] for i in q.item_ids],
                               [texts[i][2] for i in q.item_ids]),
                      ready=True) for q in records]

    def view(self, q):
        prompt, responses = q.payload[:2]
        pair = q.kind == "text"  # a comparison: the two responses side by side
        return {"prompt": prompt, "responses": list(responses),
                "left": responses[0] if pair else None, "right": responses[1] if pair else None}

    def ranked(self, q):
        return q.kind == "ranking"

    def oracle_answers(self, queries, rng):
        if self._teacher is None:
            return []
        out: list[tuple[str, Answer]] = []
        for q in queries:
            prompt, responses = q.payload[:2]
            s = np.array([float(self._teacher(prompt, r)) for r in responses])
            if q.kind == "text":
                out.append((q.query_id, "equal" if s[0] == s[1] else ("left" if s[0] > s[1]
                                                                      else "right")))
            else:
                out.append((q.query_id, [int(i) for i in np.argsort(-s, kind="stable")]))
        return out

    def comparisons(self, answered):
        out = []
        for lab, q in answered:
            if MU[lab.label] is None:
                continue
            prompt, responses, ended = q.payload
            i, j = q.item_ids.index(lab.left_id), q.item_ids.index(lab.right_id)
            out.append({"prompt": prompt, "left": responses[i], "right": responses[j],
                        "mu": MU[lab.label], "ranking_id": lab.ranking_id,
                        "left_finished": ended[i], "right_finished": ended[j]})
        return out

    def stored_pages(self, store, page_labels):
        rows = _trainable_rows(store, {"text", "ranking"})
        texts = store.texts(sorted({i for r in rows for i in (r["left_id"], r["right_id"])}))
        out = []
        for r in rows:
            prompt, left, left_ended = texts[r["left_id"]]
            _, right, right_ended = texts[r["right_id"]]
            out.append({"prompt": prompt, "left": left, "right": right,
                        "mu": MU[r["label"]], "ranking_id": r.get("ranking_id") or r["query_id"],
                        "left_finished": left_ended, "right_finished": right_ended})
        yield out  # one page: a ranking's pairs train together, and text is small
