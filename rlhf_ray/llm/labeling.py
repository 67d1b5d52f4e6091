"""What the LLM workload's labeling needs: its queries are K responses to a prompt (pairs or
rankings), answered by people or by the text oracle `labeler.oracle` (which may be built from
the run's `data` section)."""

from __future__ import annotations

from rlhf_ray.feedback.queries import TextRankings
from rlhf_ray.llm.config import LLMConfig


def query_kind(cfg: LLMConfig) -> TextRankings:
    return TextRankings(oracle=cfg.labeler.oracle, data=cfg.data.model_dump(mode="json"))
