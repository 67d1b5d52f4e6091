"""Feedback in the loop, the same for both workloads: the labeler actor (the only writer of the
preference store) with its source -- the oracle, or people on the labeling page -- and the
reward trainer's data set, fed as labels arrive.

`Feedback` starts and stops the labeler and the page (writing the page's URL, token included,
to the run folder), submits queries, hands new labels to the reward trainer, rebuilds the
trainer's data from the store when the labeler restarted (its undrained labels died with it;
the store has every acknowledged one), starts a training round when the controller's round
rule says so and publishes the new weights, and counts labels for the metrics. What a query
is -- a pair of segments or K responses to a prompt -- is the query kind's business
(`queries.py`), chosen by the workload.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import ray

from rlhf_ray.feedback.labeler import RESTART, Labeler
from rlhf_ray.feedback.page import start_labeling, stop_labeling
from rlhf_ray.feedback.queries import QueryKind
from rlhf_ray.runtime import console
from rlhf_ray.runtime.actors import kill_all, remote_role
from rlhf_ray.runtime.metrics import clean
from rlhf_ray.runtime.names import RoleNames
from rlhf_ray.runtime.sections import RoleResources


@dataclass(frozen=True)
class Round:
    """What a round rule decides on: labels answered now and when the last round began,
    whether labels arrived since the last call, whether the labeler restarted."""

    total: int
    at_last_round: int
    new: bool
    restarted: bool


def by_label_growth(growth: float) -> Callable[[Round], bool]:
    """The control workload's rule: a round once the labels grew by `growth` (a fraction)
    since the last one began. A round per handful of labels costs CPU the rollouts need and
    moves the reward under PPO's critic every iteration."""
    def due(r: Round) -> bool:
        grown = r.total - r.at_last_round
        return grown > 0 and grown >= growth * r.at_last_round
    return due


def on_new_labels(r: Round) -> bool:
    """The LLM workload's rule: a round whenever rankings arrived (or the data was rebuilt)."""
    return r.new or r.restarted


def start_labeler(cfg, kind: QueryKind, store_root: str, source: str | None = None, *,
                  name: str, res: RoleResources | None = None, **actor_opts):
    """The labeler actor of a run's config, asking queries of `kind`: restarted by Ray when
    its process dies (it reopens the store), its calls then retried."""
    lab = cfg.labeler
    return remote_role(Labeler, res or cfg.placement.labeler, name=name, **actor_opts,
                       **RESTART).remote(store_root, kind, source=source or lab.source,
                                         seed=cfg.seed, budget=cfg.labels.budget,
                                         lease_s=lab.lease_s, deadline_s=lab.deadline_s)


class Feedback:
    """`kind`: the run's query kind; `rm_keys`: the reward trainer's statistics each row
    reports; `round_rule`: when a training round starts; `page_helpers`: actors the page
    needs beside the labeler (the workload's, e.g. clip renderers)."""

    def __init__(self, cfg, run, names: RoleNames, *, kind: QueryKind,
                 rm_keys: tuple[str, ...] = (), round_rule: Callable[[Round], bool] = on_new_labels,
                 page_helpers: Callable[..., list] | None = None):
        self.cfg, self.run, self.names, self.kind = cfg, run, names, kind
        self.rm_keys, self.round_rule, self.page_helpers = rm_keys, round_rule, page_helpers
        self.labeler = None
        self.labeling = None  # the page's LabelingRoles while people label
        self.trainer = self.weight_store = None
        self.requested = 0  # queries asked for (they count against the label budget)
        self.rm_stats: dict = {}  # the last finished round's statistics
        self.labels_at_last_round = 0
        self.restarts = 0  # labeler restarts seen
        self._incarnation = None
        self._round = None  # the statistics of the round in flight (a ref)
        self._submits: list = []

    # ------------------------------------------------------------------ roles
    def start(self, source: str | None = None, url_file: bool = True) -> None:
        """The labeler (restarted by Ray when its process dies: it reopens the store), and the
        labeling page when people label; the page's URL is printed and written to the run
        folder. Serve's HTTP proxy must start with the labeler's host/port before any app."""
        source = source or self.cfg.labeler.source
        self.labeler = start_labeler(self.cfg, self.kind, self.run.store_root, source,
                                     name=self.names.labeler)
        if source != "oracle":
            self.labeling = start_labeling(self.cfg, self.names,
                                           ray.get_runtime_context().namespace,
                                           self.run.store_root, self.run.name, self.page_helpers)
            console.note(f"labeling page: {self.labeling.url}")
            if url_file:
                self.run.write_private("labeling_url.txt", self.labeling.url + "\n")

    def attach(self, trainer, weight_store) -> None:
        """The reward trainer actor this feedback feeds, and where its weights go."""
        self.trainer, self.weight_store = trainer, weight_store

    def stop(self) -> None:
        if self.labeling is not None:
            stop_labeling(self.labeling)
            self.labeling = None
        kill_all([self.labeler])

    # ------------------------------------------------------------------ asking
    def ask(self, n: int, *items, block: bool = True) -> None:
        """Submit `n` queries of the run's kind (`Labeler.submit(*items)`: clip pairs (left,
        right), text (prompts, responses)), tagged with the reward model's version. Without
        `block`, the submission is waited for before the next checkpoint (`settle`)."""
        ref = self.labeler.submit.remote(*items,
                                         rm_version=int(self.rm_stats.get("rm_version", 0)))
        if block:
            ray.get(ref)
        else:
            self._submits = [r for r in self._submits if not ray.wait([r], timeout=0)[0]] + [ref]
        self.requested += n

    def settle(self) -> None:
        """Every query asked for is in the store (before a checkpoint)."""
        ray.get(self._submits)
        self._submits = []

    def expire_overdue(self) -> None:
        """`labeler.source=mixed`: the oracle answers what people left past the deadline."""
        if self.cfg.labeler.source == "mixed":
            ray.get(self.labeler.expire_overdue.remote())

    def wait_for_labels(self, n: int, timeout_s: float = 24 * 3600, poll_s: float = 2.0) -> None:
        """Block until `n` queries are answered (people labeling the first batch)."""
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            self.expire_overdue()
            if ray.get(self.labeler.stats.remote())["labels_total"] >= n:
                return
            time.sleep(poll_s)

    # ------------------------------------------------------------------ feeding the trainer
    def _stored_pages(self, clear_undrained: bool = False):
        """The stored comparisons, as refs to pages the labeler yields one by one (at least
        one); handed on as refs, they never pass through this process."""
        return self.labeler.stored.options(num_returns="streaming").remote(
            clear_undrained=clear_undrained)

    def stored_comparisons(self) -> list[dict]:
        """Every trainable comparison in the store, in this process (what DPO fits: text
        pairs are small; the reward trainer gets pages instead, `load_stored`)."""
        return [c for page in self._stored_pages() for c in ray.get(page)]

    def load_stored(self) -> int:
        """Give the trainer every label already in the store (a reopened run: its labels
        count, none is asked for twice); returns how many queries they answer (the trainer
        counts them: comparisons, or the prompts of rankings)."""
        before = after = ray.get(self.trainer.add.remote(self.kind.empty))
        for page in self._stored_pages():
            after = ray.get(self.trainer.add.remote(page))  # one page in flight at a time
        return after - before

    def _replace_with_stored(self) -> None:
        """The trainer's whole data set becomes the store's (the labeler restarted and lost
        what it had not handed over yet; the store has every acknowledged label)."""
        for i, page in enumerate(self._stored_pages(clear_undrained=True)):
            (self.trainer.replace if i == 0 else self.trainer.add).remote(page)

    def feed(self, block: bool = False, **train_kwargs) -> None:
        """Hand new labels to the trainer; start a training round when the last one is done
        and the round rule says so (`block`: always, and wait for it). The paper's
        asynchronous reward training: rollouts never wait for a round."""
        new = ray.get(self.labeler.drain.remote())
        stats = ray.get(self.labeler.stats.remote())
        restarted = self._incarnation not in (None, stats["incarnation"])
        if restarted:
            self._replace_with_stored()
            self.restarts += 1
        elif new:
            self.trainer.add.remote(new)
        self._incarnation = stats["incarnation"]
        if self._round is not None:
            if not ray.wait([self._round], timeout=None if block else 0)[0]:
                return
            self.finish_round()
        rnd = Round(stats["labels_total"], self.labels_at_last_round, bool(new), restarted)
        if block or self.round_rule(rnd):
            self.labels_at_last_round = stats["labels_total"]
            self.start_round(**train_kwargs)
            if block:
                self.finish_round()

    def start_round(self, **train_kwargs) -> None:
        """A training round on the trainer, which then puts its weights into the weight store
        (where the reward model's replicas pick them up by version)."""
        kwargs = {k: v for k, v in train_kwargs.items() if v is not None}
        self._round = self.trainer.train_and_publish.remote(self.weight_store, **kwargs)

    def finish_round(self) -> None:
        """Wait for the round in flight, if any (its weights published), and keep its
        statistics."""
        if self._round is not None:
            self.rm_stats = ray.get(self._round) or self.rm_stats
            self._round = None

    def publish(self) -> int:
        """The trainer's current weights to the weight store (a stale version is ignored);
        returns the store's version."""
        return ray.get(self.trainer.publish.remote(self.weight_store))

    # ------------------------------------------------------------------ state and metrics
    def state(self) -> dict:
        return {"labels_requested": self.requested, "rm_stats": self.rm_stats,
                "labels_at_last_round": self.labels_at_last_round}

    def restore(self, state: dict) -> None:
        """A checkpoint's counts. Queries asked for after the checkpoint are in the store
        (answered, or pending in it): they count against the budget, so a resumed run ends
        with the same label budget."""
        self.rm_stats = dict(state.get("rm_stats") or {})
        self.labels_at_last_round = int(state.get("labels_at_last_round", 0))
        st = ray.get(self.labeler.stats.remote())
        self.requested = max(int(state["labels_requested"]),
                             st["labels_total"] + st["labels_pending"])

    def metrics(self) -> dict:
        """Label counts (in all and by source: the oracle, each person) and the reward
        trainer's last round."""
        m = {k: clean(self.rm_stats.get(k)) for k in self.rm_keys}
        m["rm_version_published"] = int(self.rm_stats.get("rm_version", 0))
        if self.labeler is None:
            return {"labels_total": 0, "labels_human": 0, "labels_oracle": 0, **m}
        st = ray.get(self.labeler.stats.remote())
        by = dict(st["labels_by_source"])
        return {"labels_total": int(st["labels_total"]), "labels_requested": self.requested,
                "labels_by_source": by, "labels_pending": st["labels_pending"],
                "labels_human": sum(v for k, v in by.items() if k.startswith("human:")),
                "labels_oracle": by.get("oracle", 0), "labeler_restarts": self.restarts, **m}
