"""What every benchmark record carries: the code version it ran (the git commit, with a hash
of uncommitted changes if any) and the machine. `python benchmarks/NAME.py` puts this folder
on `sys.path`, so the scripts import it as `record`."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNKNOWN = "unknown (recorded before runs carried their commit, 2026-12-07)"


def code_version(src: Path = REPO) -> str:
    """The commit a source tree is at, with a hash of its uncommitted changes if any."""
    git = ["git", "-C", str(src)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    diff = subprocess.run([*git, "diff", "HEAD"], capture_output=True).stdout
    return commit + (f"+dirty-{hashlib.sha256(diff).hexdigest()[:8]}" if diff else "")


def machine() -> dict:
    """The machine, and its load when asked (the 1, 5 and 15 minute load averages: a
    figure measured beside other work says so)."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "node": platform.node(),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def versions(runs: list[dict]) -> dict:
    """The code versions a record's runs ran: each one's count, and whether they are mixed
    (a comparison across them is one across code versions, and says so)."""
    seen: dict[str, int] = {}
    for r in runs:
        v = r.get("code") or UNKNOWN
        seen[v] = seen.get(v, 0) + 1
    return {"code_versions": seen, "mixed_code_versions": len(seen) > 1}


def write(out: dict, path: str | Path) -> None:
    """A benchmark's record, as JSON at `path` (its folder made)."""
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
