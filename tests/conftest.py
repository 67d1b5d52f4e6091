"""Test tiers by marker: unit (no Ray), integration and e2e (one local Ray cluster per session)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        for tier in ("unit", "integration", "e2e"):
            if f"{os.sep}{tier}{os.sep}" in path:
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster (2 CPUs, token auth on) shared by the whole session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
