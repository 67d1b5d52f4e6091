"""The names of every role's actor, Serve application and placement group of a run: the
run id makes them unique on a shared cluster, the prefix says what each one is."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoleNames:
    """Every named actor, Serve application and placement group of one run (or trial): the
    run id makes them unique on a shared cluster, the prefix says what each one is."""

    run_id: str
    workload: str  # its name: a run's placement group is `rlhf-<workload>-<run id>`

    def of(self, role: str) -> str:
        return f"rlhf-{role}-{self.run_id}"

    labeler = property(lambda self: self.of("labeler"))
    weights = property(lambda self: self.of("weights"))  # the reward model's weight store
    pool = property(lambda self: self.of("pool"))  # the segment pool (control)
    reward_app = property(lambda self: self.of("rm"))
    label_app = property(lambda self: self.of("label"))
    group = property(lambda self: self.of(self.workload))  # a run's own placement group

    def renderer(self, i: int) -> str:
        return f"{self.of('render')}-{i}"


# the Serve applications a run starts (a sweep removes what stopped trials left behind)
APP_PREFIXES = ("rlhf-rm-", "rlhf-label-")
