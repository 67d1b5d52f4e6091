"""The control workload's report: learning curves over env steps (true return, predicted
return, labels, reward-model accuracy) and the final policy's video (`final_policy.webm`)
from its first evaluation episode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from rlhf_ray.control.config import ControlConfig
from rlhf_ray.control.envs import probe
from rlhf_ray.feedback.clips import ClipRenderer


def report(run_dir: str, rows: list[dict], output: str | None, plt,
           shown_as: str | None = None) -> str:
    """Curves over env steps (PNG) and the final policy's video. `shown_as`: the run's own
    location, for what is printed (a remote run is drawn in a local copy)."""

    def series(key):
        return points(rows, key)

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    ax.plot(*series("true_return_mean"), label="true return (env reward)")
    ax.set_title("true return")
    ax.set_xlabel("env steps")
    ax = axes[0, 1]
    ax.plot(*series("pred_return_mean"), color="tab:orange")
    ax.set_title("predicted return (reward model)")
    ax.set_xlabel("env steps")
    ax = axes[1, 0]
    ax.plot(*series("labels_total"), color="tab:green")
    ax.set_title("labels")
    ax.set_xlabel("env steps")
    ax = axes[1, 1]
    ax.plot(*series("rm_val_accuracy"), color="tab:red", label="validation")
    ax.plot(*series("rm_train_accuracy"), color="tab:purple", alpha=0.6, label="train")
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("reward-model accuracy on held-out comparisons")
    ax.set_xlabel("env steps")
    if not series("pred_return_mean")[0]:  # a true-reward run (run.reward=env)
        for a in (axes[0, 1], axes[1, 1]):
            title = a.get_title()
            a.clear()
            a.set(title=title, xticks=[], yticks=[])
            a.text(0.5, 0.5, "no reward model: trained on the env reward", ha="center",
                   va="center", transform=a.transAxes, color="gray")
    final = _final_eval(run_dir)
    if final:
        axes[0, 0].axhline(final["return_mean"], color="black", ls="--", lw=1,
                           label=f"final policy, {final['episodes']} fresh episodes")
        axes[0, 0].legend(fontsize=8)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = output or str(Path(run_dir) / "report.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    video = final_policy_video(run_dir, Path(out).parent)
    if video and shown_as:
        video = f"{shown_as}/{Path(video).name}"
    print(f"final policy video: {video}" if video else
          "no final policy video: the run kept no final episode (final_episode.npz)")
    return out


def points(rows: list[dict], key: str) -> tuple[list, list]:
    """(env steps, value) of the rows that have `key`: an Atari iteration often ends no
    episode, and a line through its gaps would be drawn in pieces."""
    kept = [(r["env_steps"], r[key]) for r in rows if r.get(key) is not None]
    return [s for s, _ in kept], [v for _, v in kept]


def _final_eval(run_dir: str) -> dict | None:
    path = Path(run_dir) / "final_eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def final_policy_video(run_dir: str, out_dir: Path, fps: int = 25,
                       max_frames: int = 300) -> Path | None:
    """The final policy's first evaluation episode as a WebM (`final_policy.webm`), MuJoCo
    re-rendered from its simulator states at about real time, Atari from its frames; at most
    `max_frames` frames."""
    path = Path(run_dir) / "final_episode.npz"
    if not path.exists():
        return None
    arrays = dict(np.load(path))
    cfg = ControlConfig.model_validate(yaml.safe_load((Path(run_dir) / "config.yaml").read_text()))
    env = cfg.env.model_dump(mode="json")
    if env.get("preprocessing") == "atari":
        skip = 1
    else:
        skip = max(1, round(1.0 / (probe(env).dt * fps)))  # about real time
    renderer = ClipRenderer(env, width=320, height=240, fps=fps, frame_skip=skip)
    arrays = {k: v[: max_frames * skip] for k, v in arrays.items()}
    out = out_dir / "final_policy.webm"
    out.write_bytes(renderer.render(arrays))
    return out
