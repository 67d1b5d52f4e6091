"""Placement: which role gets which resources, declared once by the workload from its config
(`Placement`), made into a placement group's bundles (`PlacementPlan`) that a run with
`placement.group_strategy` and a Tune trial both use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Placement:
    """A workload's roles as its config declares them: the driver's bundle (the controller,
    and whatever runs inside it), then every role actor with its resources, in bundle order.
    `pin_empty`: an actor that asks for nothing still gets a bundle of its own (else it is
    left out: RLlib places such actors itself)."""

    driver: dict[str, float]
    actors: list[tuple[str, Any]]  # (role, RoleResources), one entry per actor
    pin_empty: bool = False


@dataclass
class PlacementPlan:
    """A run's placement group as the config declares it: bundle 0 for the driver (the
    controller, and the control workload's in-driver learner), then one bundle per role
    actor, and which bundles each role's actors take. Runs with `placement.group_strategy`
    and Tune trials use the same plan."""

    bundles: list[dict[str, float]]
    roles: dict[str, list[int]] = field(default_factory=dict)

    def bundle(self, role: str, i: int = 0) -> int | None:
        idx = self.roles.get(role)
        return idx[i] if idx and i < len(idx) else None


def bundle_of(res, cpu_floor: float = 0.0) -> dict[str, float]:
    d = {"CPU": max(float(res.num_cpus), cpu_floor)}
    if res.num_gpus:
        d["GPU"] = float(res.num_gpus)
    d.update(res.resources)
    return d


def placement_plan(placement: Placement, driver: dict[str, float] | None = None) -> PlacementPlan:
    """The plan of a workload's `Placement`: bundle 0 for the driver (`driver`, else the
    placement's own), one bundle per role actor."""
    plan = PlacementPlan([dict(driver or placement.driver)])
    for role, res in placement.actors:
        b = bundle_of(res)
        if not any(v > 0 for v in b.values()):
            if not placement.pin_empty:
                continue  # RLlib places its actors itself: an empty bundle holds nothing
            b = {"CPU": 0.01}  # pinned to a bundle of its own all the same
        plan.roles.setdefault(role, []).append(len(plan.bundles))
        plan.bundles.append(b)
    return plan


def start_group(plan: PlacementPlan, strategy: str, timeout_s: float, name: str):
    """A placement group of the plan's bundles (the driver's bundle included, so indices
    match); a clear error when it cannot be placed in time."""
    import ray
    from ray.util import remove_placement_group
    from ray.util.placement_group import placement_group

    pg = placement_group(plan.bundles, strategy=strategy, name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(
            f"placement.group_strategy={strategy}: the bundles {plan.bundles[1:]} could not be "
            f"placed within {timeout_s:.0f} s (cluster resources: {ray.cluster_resources()}); "
            "lower the roles' resources, add nodes or use PACK")
    return pg
