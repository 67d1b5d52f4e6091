"""The yardstick on held-out prompts: an independent judge (`eval.yardstick`, else the
labeler's oracle), never trained on and never the training signal, with the reward model's
score beside it. The SFT model is judged once before PPO (its samples also calibrate the
reward normalization); the policy every `eval.every` iterations and at the end, with Gao et
al. 2022's warning when the reward model's score keeps rising while the yardstick's does not.
Where the config has held-out human-written text (`data.pretrain_path`, the reviews task),
each evaluation also measures its perplexity under the policy (`eval_text_ppl`, the SFT
model's as `sft_eval_text_ppl`): InstructGPT's alignment tax, which PPO-ptx pays less of.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlhf_ray.llm.config import LLMConfig
from rlhf_ray.llm.data import load_prompts
from rlhf_ray.llm.yardstick import disagreement, load_yardstick
from rlhf_ray.runtime import console
from rlhf_ray.runtime.actors import retry_call
from rlhf_ray.runtime.metrics import clean


class HeldOut:
    def __init__(self, cfg: LLMConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.prompts = load_prompts(cfg, split="eval")[:cfg.eval.num_prompts]
        self.judge = None  # loaded on first use
        self.sft: dict = {}  # the SFT model's evaluation (means)
        self.evals: list[dict] = []  # every evaluation of the policy so far (means)
        # one sampling seed for every evaluation (no training call draws it): the SFT model
        # and each policy sample the same prompts with the same random draws, so the gain
        # between them is a paired difference, not two independent samples' noise
        self.seed = 2**31 + cfg.seed
        self.rm_version: int | None = None  # the reward model's that scored the last one
        # () -> the policy's perplexity of held-out human text (the learner group's), or None
        self.text_ppl = None

    def yardstick(self):
        """The judge, or None where the config names neither `eval.yardstick` nor
        `labeler.oracle` (the evaluation then has the reward model's score and the KL only)."""
        if self.judge is None and (self.cfg.eval.yardstick or self.cfg.labeler.oracle):
            self.judge = load_yardstick(self.cfg)
        return self.judge

    def evaluate(self, generation, rm_handle) -> tuple[dict, np.ndarray, list[dict]]:
        """The policy on the held-out prompts: the yardstick's means (`eval_<key>_mean`) and
        the reward model's (none where `rm_handle` is None), its raw scores, and the samples
        with their scores."""
        out = generation.generate(self.prompts, seed=self.seed)
        if rm_handle is None:  # no reward model (DPO): the yardstick only
            res = {"scores": [float("nan")] * len(out["texts"])}
        else:
            res = retry_call(lambda: rm_handle.score.remote(out["prompts"], out["texts"],
                                                            finished=out["finished"]))
        self.rm_version = res.get("version")
        judge = self.yardstick()
        judged = judge.score(out["prompts"], out["texts"]) if judge is not None else {}
        ev = {f"eval_{k}_mean": float(np.mean(v)) for k, v in judged.items()}
        if rm_handle is not None:
            ev["eval_rm_score_mean"] = float(np.mean(res["scores"]))
        ppl = self.text_ppl() if self.text_ppl is not None else None
        if ppl is not None:
            ev["eval_text_ppl"] = ppl
        samples = [{"prompt": p, "response": r, "rm_score": float(q),
                    "finished": out["finished"][i], **{k: float(v[i]) for k, v in judged.items()}}
                   for i, (p, r, q) in enumerate(zip(out["prompts"], out["texts"],
                                                     res["scores"]))]
        return ev, np.asarray(res["scores"], dtype=np.float64), samples

    def judge_sft(self, generation, rm_handle) -> tuple[np.ndarray, list[dict], int | None]:
        """The SFT model's evaluation (kept for every later row); returns the reward model's
        raw scores of its samples, the samples and the reward model's version (what the
        reward normalization is measured on)."""
        ev, raw, samples = self.evaluate(generation, rm_handle)
        self.sft = ev
        self.write_samples("sft", samples)
        return raw, samples, self.rm_version

    def row(self, iteration: int, final: bool, generation, rm_handle) -> dict:
        """A held-out evaluation's row entries, the SFT model's beside them, and whether the
        reward model and the yardstick part ways."""
        ev, _, samples = self.evaluate(generation, rm_handle)
        self.evals.append({"iteration": iteration, **ev})
        if final:
            self.write_samples("final", samples)
        row = {k: clean(v) for k, v in ev.items()}
        row.update({f"sft_{k}": clean(v) for k, v in self.sft.items()})
        judged = all(e.get("eval_score_mean") is not None for e in self.evals)
        gap = disagreement([e["eval_rm_score_mean"] for e in self.evals],
                           [e["eval_score_mean"] for e in self.evals]) if judged else None
        row["rm_judge_diverging"] = gap is not None
        if gap is not None:
            console.note(f"warning: iteration {iteration}: the reward model's held-out score "
                         f"keeps rising ({gap['rm_slope']:+.2f}/eval) while the yardstick's does "
                         f"not ({gap['yardstick_slope']:+.2f}/eval): the policy may be exploiting "
                         "the reward model (Gao et al. 2022)")
        return row

    def write_samples(self, tag: str, samples: list[dict]) -> None:
        """The held-out samples of one evaluation (`samples_<tag>.jsonl`; the report's table)."""
        with open(self.run_dir / f"samples_{tag}.jsonl", "w", encoding="utf-8") as f:
            for row in samples:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def state(self) -> dict:
        return {"sft_eval": self.sft, "evals": self.evals}

    def restore(self, state: dict, iteration: int) -> None:
        self.sft = dict(state.get("sft_eval") or {})
        self.evals = [e for e in state.get("evals") or [] if e["iteration"] <= iteration]
