"""`rlhf-ray report RUN_DIR`: a run's report, drawn by its workload (`control/report.py`:
curves over env steps and the final policy's video; `llm/report.py`: curves over PPO
iterations and `report.md`)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import yaml

from rlhf_ray import workloads
from rlhf_ray.runtime.metrics import read_metrics
from rlhf_ray.runtime.run_dir import ROLE_WRITTEN
from rlhf_ray.runtime.workload import Workload
from rlhf_ray.storage import locations


def report(run_dir: str, output: str | None = None) -> str:
    """The report of a run folder (a path or a URI: a remote run is read into a local working
    copy, drawn there, and the report's files are written back beside the run's)."""
    if locations.is_remote(run_dir):
        uri = locations.normalize(run_dir)
        if not locations.is_file(locations.join(uri, "metrics.jsonl")):
            raise FileNotFoundError(f"{uri}/metrics.jsonl: no metrics (is {uri} a run folder?)")
        local = Path(tempfile.mkdtemp(prefix="rlhf-report-")) / locations.name(uri)
        mirror = locations.Mirror(local, uri, exclude=ROLE_WRITTEN)
        mirror.pull(skip=ROLE_WRITTEN)
        out = _report(str(local), None, shown_as=uri)
        mirror.push()
        if output:
            shutil.copy(out, output)
            return output
        return locations.join(uri, Path(out).name)
    return _report(run_dir, output)


def workload_of(run_dir: str) -> Workload:
    """The workload a run folder's config names (a folder of metrics alone: the default)."""
    path = Path(run_dir) / "config.yaml"
    data = yaml.safe_load(path.read_text()) if path.exists() else None
    return workloads.named((data or {}).get("workload"))


def _report(run_dir: str, output: str | None = None, shown_as: str | None = None) -> str:
    """`shown_as`: the run's own location, for what is printed (a remote run is drawn in a
    local copy)."""
    import matplotlib  # 0.5 s: only where a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl is empty")
    return workload_of(run_dir).report(run_dir, rows, output, plt, shown_as=shown_as)
