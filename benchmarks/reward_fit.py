"""How well the reward-model ensemble fits synthetic preferences, away from RL.

Segments come from a family of random linear policies (a = tanh(W o + b), W of several
scales) on a MuJoCo env: some run forward, some backward, some fall or flip. Labels come from
the perfectly rational oracle; the trainer sees them as the loop gives them (a first batch,
a pretraining round, then rounds as the labels grow) and is scored on pairs of segments it
never saw, drawn from policies it never saw:
  - pair accuracy of the ensemble's mean reward (decided pairs), and
  - Spearman correlation of predicted with true segment return.
Every variant (reward_model.* overrides) runs on the same segments, pairs and seeds, side by
side:

    python benchmarks/reward_fit.py --env HalfCheetah-v5 \
        --variant default= --variant raw_inputs=reward_model.normalize_inputs=false
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def collect(env_id: str, kwargs: dict, n_policies: int, steps: int, seg_len: int,
            seed: int) -> dict[str, np.ndarray]:
    """Segments of `seg_len` steps from `n_policies` random linear policies: obs [N, k, d],
    act [N, k, a], rew [N, k], policy [N]."""
    import gymnasium as gym

    env = gym.make(env_id, **kwargs)
    rng = np.random.default_rng(seed)
    d = env.observation_space.shape[0]
    a_dim = env.action_space.shape[0]
    out = {"obs": [], "act": [], "rew": [], "policy": []}
    for p in range(n_policies):
        scale = rng.choice([0.0, 0.1, 0.3, 1.0])
        w = rng.normal(0, scale, size=(a_dim, d))
        b = rng.normal(0, 0.5, size=a_dim)
        noise = rng.choice([0.1, 0.5])
        obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
        ep = {"obs": [], "act": [], "rew": []}
        for _ in range(steps):
            act = np.clip(np.tanh(w @ obs + b) + noise * rng.normal(size=a_dim), -1, 1)
            nxt, r, term, trunc, _ = env.step(act)
            ep["obs"].append(obs)
            ep["act"].append(act)
            ep["rew"].append(r)
            obs = nxt
            if term or trunc:
                obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
        for start in range(0, steps - seg_len + 1, seg_len):
            for key in ("obs", "act", "rew"):
                out[key].append(np.asarray(ep[key][start:start + seg_len], dtype=np.float32))
            out["policy"].append(p)
    env.close()
    return {k: np.stack(v) for k, v in out.items()}


def fit_and_score(data: dict, train_mask: np.ndarray, overrides: list[str], labels: int,
                  seed: int, test_pairs: np.ndarray) -> dict:
    import torch

    from rlhf_ray.config import apply_overrides
    from rlhf_ray.control.config import RewardModelConfig
    from rlhf_ray.control.reward import RewardNetSpec, as_tensors
    from rlhf_ray.control.reward_trainer import RewardTrainer
    from rlhf_ray.core.comparisons import Comparisons
    from rlhf_ray.core.oracle import SyntheticOracle
    from rlhf_ray.core.query_selection import candidate_pairs

    raw = apply_overrides({}, overrides)
    cfg = RewardModelConfig(**raw.get("reward_model", {}))
    spec = RewardNetSpec(net="mlp", obs_shape=data["obs"].shape[2:], act_dim=data["act"].shape[2],
                         hidden=tuple(cfg.hidden), ensemble_size=cfg.ensemble_size,
                         output_std=cfg.output_std)
    trainer = RewardTrainer(spec, cfg, seed=seed)
    rng = np.random.default_rng(seed)
    train_idx = np.flatnonzero(train_mask)
    oracle = SyntheticOracle()
    mu_of = {"left": 1.0, "right": 0.0, "equal": 0.5}

    def add(n):
        pairs = train_idx[candidate_pairs(len(train_idx), n, rng)]
        ans = oracle.label(data["rew"][pairs[:, 0]], data["rew"][pairs[:, 1]], rng)
        trainer.add(Comparisons(data["obs"][pairs[:, 0]], data["act"][pairs[:, 0]],
                                data["obs"][pairs[:, 1]], data["act"][pairs[:, 1]],
                                np.array([mu_of[x] for x in ans], dtype=np.float32)))

    t0 = time.time()
    first = labels // 4
    add(first)
    trainer.train(max(1, cfg.pretrain_steps))
    have = first
    while have < labels:  # rounds as the loop spaces them: labels grow by round_label_growth
        n = min(labels - have, max(1, int(have * max(cfg.round_label_growth, 0.05))))
        add(n)
        have += n
        stats = trainer.train()
    test_segs = np.unique(test_pairs)
    n, k = data["obs"][test_segs].shape[:2]
    o, a = as_tensors(data["obs"][test_segs].reshape(n * k, -1), data["act"][test_segs].reshape(n * k, -1))
    with torch.no_grad():
        pred = trainer.ensemble.member_rewards(o, a).mean(0).reshape(n, k).sum(1).numpy()
    pred_of = dict(zip(test_segs.tolist(), pred))
    true = data["rew"].sum(1)
    pl = np.array([pred_of[i] for i in test_pairs[:, 0]])
    pr = np.array([pred_of[i] for i in test_pairs[:, 1]])
    tl, tr = true[test_pairs[:, 0]], true[test_pairs[:, 1]]
    decided = tl != tr
    acc = float(((pl > pr) == (tl > tr))[decided].mean())
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    spearman = float(np.corrcoef(rank(pred), rank(true[test_segs]))[0, 1])
    return {"test_accuracy": acc, "spearman": spearman, "rm_val_accuracy": stats["rm_val_accuracy"],
            "fit_s": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="HalfCheetah-v5")
    ap.add_argument("--seg-len", type=int, default=30)
    ap.add_argument("--policies", type=int, default=60)
    ap.add_argument("--steps", type=int, default=1000, help="env steps per policy")
    ap.add_argument("--labels", type=int, default=700)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=override[,override...] (reward_model.* keys); repeatable")
    ap.add_argument("--out", default=None, help="JSON file for the record")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    variants = {}
    for v in args.variant or ["default="]:
        name, _, ovs = v.partition("=")
        variants[name] = [o for o in ovs.split(",") if o]
    kwargs = {"terminate_when_unhealthy": False} if args.env.startswith("Hopper") else {}
    record = {"env": args.env, "seg_len": args.seg_len, "labels": args.labels, "results": {}}
    for seed in args.seeds:
        data = collect(args.env, kwargs, args.policies, args.steps, args.seg_len, seed)
        rng = np.random.default_rng(seed + 1000)
        test_policies = rng.choice(args.policies, size=args.policies // 4, replace=False)
        train_mask = ~np.isin(data["policy"], test_policies)
        test_idx = np.flatnonzero(~train_mask)
        test_pairs = test_idx[rng.integers(0, len(test_idx), size=(4000, 2))]
        test_pairs = test_pairs[test_pairs[:, 0] != test_pairs[:, 1]]
        for name, ovs in variants.items():
            res = fit_and_score(data, train_mask, ovs, args.labels, seed, test_pairs)
            record["results"].setdefault(name, []).append({"seed": seed, **res})
            print(f"{args.env} seed {seed} {name:20s} test acc {res['test_accuracy']:.3f}  "
                  f"spearman {res['spearman']:.3f}  val acc {res['rm_val_accuracy']:.3f}  "
                  f"{res['fit_s']:.0f}s", flush=True)
    print("mean over seeds:")
    for name, rs in record["results"].items():
        print(f"  {name:20s} test acc {statistics.fmean(r['test_accuracy'] for r in rs):.3f}  "
              f"spearman {statistics.fmean(r['spearman'] for r in rs):.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
