"""What the control workload's labeling needs: its queries are pairs of trajectory segments
(answered by people, or by a B-Pref teacher on their true returns), shown as clips that
renderer actors keep ready ahead of the page."""

from __future__ import annotations

from rlhf_ray.control.config import ControlConfig
from rlhf_ray.feedback.clips import ClipRenderWorker
from rlhf_ray.feedback.queries import ClipPairs
from rlhf_ray.runtime.actors import remote_role
from rlhf_ray.runtime.names import RoleNames


def query_kind(cfg: ControlConfig) -> ClipPairs:
    """Clip pairs, with the config's synthetic teacher."""
    return ClipPairs(oracle=cfg.labeler.oracle.model_dump())


def clip_renderers(cfg: ControlConfig, names: RoleNames, labeler_ns: str, store_root: str,
                   nice: int | None = None, **actor_opts) -> list:
    """`labeler.clip_renderers` actors keeping the labeler's clips rendered ahead of the
    page (`labeler_ns`: the labeler's namespace); `nice`: their niceness (default
    `placement.batch_nice`); `actor_opts`: more Ray actor options (their own namespace,
    lifetime, get_if_exists for the served app's detached ones)."""
    lab = cfg.labeler
    nice = cfg.placement.batch_nice if nice is None else nice
    return [remote_role(ClipRenderWorker, cfg.placement.clip_renderer, nice=nice,
                        name=names.renderer(i), runtime_env={"env_vars": {"MUJOCO_GL": "egl"}},
                        **actor_opts).remote(
        names.labeler, labeler_ns, store_root, cfg.env.model_dump(mode="json"), lab.clips.width,
        lab.clips.height, lab.clips.fps, lab.clips.frame_skip, lab.clips.shadows)
        for i in range(lab.clip_renderers)]
