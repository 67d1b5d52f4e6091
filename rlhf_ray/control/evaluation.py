"""The final policy on fresh episodes: the benchmark's yardstick, the true return with
actions at the policy's mean (`explore=False`), and beside it what says why that return may
differ from the training samples' (a policy whose mean actions fail where its samples walk):

- the return of as many episodes with actions sampled, as in training;
- the policy's action noise (the mean standard deviation of its Gaussian over the visited
  states) on both sets;
- the reward model's predicted return of the same episodes against their true return (their
  correlation over episodes and over steps): how well it judges the states the final policy
  reaches, such as lying on the ground, which the clips of training rarely show.

It runs on the rollout workers, whose observation filters are the policy's; RLlib's smoothed
`episode_return_mean` lags the policy by its 100-episode window.
"""

from __future__ import annotations

import math
import time

import numpy as np

from rlhf_ray.control import envs
from rlhf_ray.control.rllib import episode_arrays
from rlhf_ray.control.serve import score_chunks


def _episodes(runner, k: int, explore: bool, layout, bounds, keep_first: bool):
    """k fresh episodes on one rollout worker: each one's return, length, mean action std
    and (for vector observations) its observations and executed actions; the first one's
    arrays with simulator state or frames for the video when `keep_first`."""
    eps = runner.sample(num_episodes=k, explore=explore)
    first, out = None, []
    for i, ep in enumerate(eps):
        n = len(ep)
        row = {"return": float(ep.get_return()), "length": n, "action_std": None}
        try:  # a diagonal Gaussian's inputs: means, then log-stds
            dist = np.asarray(ep.get_extra_model_outputs("action_dist_inputs")[:n], float)
            if bounds is not None and dist.ndim == 2 and dist.shape[1] % 2 == 0:
                row["action_std"] = float(np.exp(dist[:, dist.shape[1] // 2:]).mean())
        except (KeyError, IndexError, TypeError, ValueError):
            pass
        # vector observations carry the raw obs and simulator state in their infos, except in
        # a true-reward baseline, which packs none (it needs none to train, and gets no video)
        if layout is not None and n and ep.get_infos(0).get(envs.INFO_KEY) is not None:
            arr = episode_arrays(ep, n, layout, with_state=keep_first and i == 0,
                                 action_bounds=bounds)
            row.update(obs=arr["obs"], actions=arr["actions"], true_rewards=arr["true_rewards"])
            if keep_first and i == 0:
                first = arr
        elif keep_first and i == 0:  # Atari: the newest of each stacked frame is the video
            first = episode_arrays(ep, n, None, with_state=True)
            first["obs"] = first["obs"][..., -1:]
        out.append(row)
    return out, first


def _predicted(rows: list[dict], rm_handle, version) -> np.ndarray | None:
    """The reward model's predicted return of each episode (ensemble mean) and its per-step
    rewards, scored in one pinned call."""
    if rm_handle is None or not rows or any("obs" not in r for r in rows):
        return None
    obs = np.concatenate([r["obs"] for r in rows])
    act = np.concatenate([r["actions"] for r in rows])
    results = score_chunks(rm_handle, obs, act, 4096, version=version)
    members = np.concatenate([r["members"] for r in results], axis=1)  # [K, steps]
    return members.mean(axis=0)


def _corr(a, b) -> float | None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _summary(rows: list[dict], per_step: np.ndarray | None, true_steps: list) -> dict:
    returns = [r["return"] for r in rows]
    stds = [r["action_std"] for r in rows if r["action_std"] is not None]
    out = {"episodes": len(rows), "returns": returns,
           "return_mean": sum(returns) / len(returns) if returns else float("nan"),
           "action_std_mean": float(np.mean(stds)) if stds else None}
    if per_step is not None:
        cuts = np.cumsum([r["length"] for r in rows])[:-1]
        pred = [float(p.sum()) for p in np.split(per_step, cuts)]
        out["rm"] = {"pred_returns": pred, "pred_return_mean": float(np.mean(pred)),
                     "corr_episodes": _corr(pred, returns),
                     "corr_steps": _corr(per_step, np.concatenate(true_steps))}
    return out


def final_evaluation(algo, layout, bounds, n: int, rm_handle=None, version=None,
                     sampled: bool = True) -> tuple[dict, dict | None]:
    """The final policy's returns on n fresh episodes with mean actions (`return_mean`) and,
    with `sampled`, n with sampled actions (`sampled`), each with the action noise and the
    reward model's view of them. Returns (the record, the first mean-action episode's
    arrays for the video)."""
    t0 = time.perf_counter()
    group = algo.env_runner_group
    remote = group.num_remote_env_runners() if group is not None else 0
    k = math.ceil(n / max(1, remote))

    def collect(explore: bool):
        def one(runner):
            return _episodes(runner, k, explore, layout, bounds, keep_first=not explore)

        if remote:
            return group.foreach_env_runner(one, local_env_runner=False)
        return [one(algo.env_runner)]

    out, first = {}, None
    for explore in ([False, True] if sampled else [False]):
        per_runner = collect(explore)
        rows = [r for rs, _ in per_runner for r in rs]
        if not explore:
            first = next((ep for _, ep in per_runner if ep is not None), None)
        per_step = _predicted(rows, rm_handle, version)
        summary = _summary(rows, per_step, [r["true_rewards"] for r in rows]
                           if per_step is not None else [])
        if explore:
            out["sampled"] = summary
        else:
            out.update(summary)
    out.update({"explore": False, "eval_s": time.perf_counter() - t0})
    return out, first
