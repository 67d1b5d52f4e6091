"""The controller of the control workload: deep RL from human preferences on Ray.

`train(cfg)` is a function of (config, where metrics go), so the CLI, a `ray job submit`
entrypoint and a Tune trial run the same code. It joins a running Ray cluster (RAY_ADDRESS or
an initialized driver) or starts a local one, wires the roles with the configured resources,
and runs the loop of Christiano et al. 2017, section 2.2:

  0. roles up: weight store, segment pool, labeler, reward trainer, reward-model deployment,
     RLlib PPO (env runners = rollout workers, learner group = PPO learner);
  1. initial labels: segments of the initial policy, uniform pairs, labels, reward-model pretrain;
  2. per iteration: PPO iteration on relabelled rewards -> labels due by the schedule ->
     query selection by ensemble disagreement -> labeler -> reward trainer (async) ->
     metrics -> checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from rlhf_ray.config import Config, dump_config
from rlhf_ray.control import envs
from rlhf_ray.control.rllib_glue import action_bounds, build_ppo_config, info_layout
from rlhf_ray.core.query_selection import select_queries
from rlhf_ray.core.schedule import LabelSchedule
from rlhf_ray.core.segments import SegmentBatch, default_segment_length
from rlhf_ray.metrics import MetricsWriter, find_metric
from rlhf_ray.reward_model import RewardNetSpec, save_weights
from rlhf_ray.roles import init_ray
from rlhf_ray.roles import remote_role as _remote

CHECKPOINT_FORMAT = 1


@dataclass
class Roles:
    namespace: str
    app_name: str
    weight_store: object
    pool: object
    labeler: object
    trainer: object
    spec: RewardNetSpec
    rm_handle: object
    labeling: object = None  # LabelingRoles when humans label


def reward_spec(cfg: Config) -> RewardNetSpec:
    import gymnasium as gym

    obs_space, act_space = envs.spaces(cfg.env.model_dump(mode="json"))
    net = cfg.reward_net()
    discrete = isinstance(act_space, gym.spaces.Discrete)
    act_dim = int(act_space.n) if discrete else int(np.prod(act_space.shape))
    obs_shape = tuple(obs_space.shape)
    return RewardNetSpec(net=net, obs_shape=obs_shape, act_dim=act_dim, discrete=discrete,
                         hidden=tuple(cfg.reward_model.hidden),
                         ensemble_size=cfg.reward_model.ensemble_size,
                         output_std=cfg.reward_model.output_std, dropout=cfg.reward_model.dropout)


def segment_length(cfg: Config) -> int:
    if cfg.labels.segment_length:
        return cfg.labels.segment_length
    env_cfg = cfg.env.model_dump(mode="json")
    atari = cfg.env.preprocessing == "atari"
    return default_segment_length(envs.env_dt(env_cfg), cfg.labels.segment_seconds, atari)


def start_roles(cfg: Config, store_root: str, run_id: str) -> Roles:
    import ray

    from rlhf_ray import serve_rm
    from rlhf_ray.labeler import RESTART as LABELER_RESTART
    from rlhf_ray.labeler import Labeler
    from rlhf_ray.reward_trainer import RewardTrainer
    from rlhf_ray.segment_pool import SegmentPool
    from rlhf_ray.weights import WeightStore

    ns = ray.get_runtime_context().namespace
    place = cfg.placement
    spec = reward_spec(cfg)
    weight_store = _remote(WeightStore, place.labeler, name=f"rlhf-weights-{run_id}").remote()
    pool = _remote(SegmentPool, place.labeler, name=f"rlhf-pool-{run_id}").remote(
        cfg.labels.pool_size, cfg.seed)
    lab = cfg.labeler
    labeler = _remote(Labeler, place.labeler, name=f"rlhf-labeler-{run_id}",
                      **LABELER_RESTART).remote(
        store_root, lab.source, lab.oracle.model_dump(), cfg.seed, cfg.labels.budget,
        lab.lease_s, lab.deadline_s, lab.text_oracle)
    labeling = None
    if lab.source != "oracle":
        from rlhf_ray.labeling.service import start_labeling

        # Serve's HTTP proxy must start with the labeler's host/port, before any app runs.
        labeling = start_labeling(cfg, labeler_name=f"rlhf-labeler-{run_id}", namespace=ns,
                                  store_root=store_root, run_id=run_id)
    trainer = _remote(RewardTrainer, place.reward_trainer).remote(
        spec, cfg.reward_model, cfg.seed, cfg.run.torch_threads, place.batch_nice)
    app_name = f"rlhf-rm-{run_id}"
    handle = serve_rm.deploy(spec, app_name=app_name, weight_store=f"rlhf-weights-{run_id}",
                             namespace=ns, serve_cfg=place.reward_model,
                             torch_threads=cfg.run.torch_threads, wait=False)
    return Roles(ns, app_name, weight_store, pool, labeler, trainer, spec, handle, labeling)


def stop_roles(roles: Roles | None) -> None:
    import ray
    from ray import serve

    if roles is None:
        return
    if roles.labeling is not None:
        from rlhf_ray.labeling.service import stop_labeling

        stop_labeling(roles.labeling)
    try:
        serve.delete(roles.app_name)
    except Exception:  # noqa: BLE001 - best effort at shutdown
        pass
    for actor in (roles.trainer, roles.labeler, roles.pool, roles.weight_store):
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001
            pass


def member_returns(handle, batch: SegmentBatch, chunk_segments: int = 256) -> np.ndarray:
    """Each ensemble member's predicted return of each segment: [K, N] (one batched request
    per chunk, all in flight at once)."""
    from rlhf_ray.serve_rm import score_chunks

    obs, act = batch.arrays["obs"], batch.arrays["actions"]
    n, k = obs.shape[:2]
    results = score_chunks(handle, obs.reshape(n * k, *obs.shape[2:]),
                           act.reshape(n * k, *act.shape[2:]), chunk_segments * k)
    members = np.concatenate([r["members"] for r in results], axis=1)
    return members.reshape(members.shape[0], n, k).sum(axis=2)


class Controller:
    """Holds the run's state; `run()` is the loop."""

    def __init__(self, cfg: Config, run_dir: str | None = None,
                 on_metrics: Callable[[dict], None] | None = None, progress: bool = True,
                 stop_event=None):
        self.cfg = cfg
        self.stop_event = stop_event  # a threading.Event: set it to end the run after this iteration
        self.on_metrics = on_metrics
        self.progress = progress
        # a given run folder names the run (a resumed run finds its remote store again)
        name = cfg.run.run_name or (Path(run_dir).name if run_dir else None) or \
            f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        remote_store = "://" in cfg.run.storage_path
        if run_dir is None:
            run_dir = os.path.join("runs" if remote_store else cfg.run.storage_path, name)
        self.run_dir = Path(run_dir)
        self.store_root = (f"{cfg.run.storage_path.rstrip('/')}/{name}/preferences" if remote_store
                           else str(self.run_dir / "preferences"))
        self.run_id = uuid.uuid4().hex[:8]
        self.rng = np.random.default_rng(cfg.seed)
        self.schedule = LabelSchedule(cfg.labels.budget, cfg.labels.initial_fraction,
                                      cfg.labels.t0_steps, cfg.run.total_env_steps)
        self.requested = 0
        self.iteration = 0
        self.initial_env_steps = 0
        self.rm_stats: dict = {}
        self.labels_at_last_round = 0
        self.train_ref = None
        self.env_steps = 0
        self.labeler_incarnation = None
        self.labeler_restarts = 0
        self.algo = None  # RLlib's Algorithm while the loop runs

    # ------------------------------------------------------------------ phases
    def run(self, resume_from: str | None = None) -> dict:
        """The whole loop; `resume_from`: a checkpoint folder of this run to continue from."""
        import ray

        cfg = self.cfg
        learned = cfg.run.reward == "learned"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        started = init_ray(cfg)
        envs.register()
        roles, algo, writer = None, None, None
        t_start = time.time()
        last = {}
        try:
            # 0. roles up
            self.seg_len = segment_length(cfg)
            if learned:
                roles = start_roles(cfg, self.store_root, self.run_id)
                segments = {"pool_name": f"rlhf-pool-{self.run_id}", "namespace": roles.namespace,
                            "length": self.seg_len, "per_sample": cfg.labels.segments_per_sample,
                            "layout": info_layout(cfg), "seed": cfg.seed,
                            "action_bounds": action_bounds(cfg)}
                relabel = (roles.app_name, "RewardModel")
            else:
                segments, relabel = None, None
            if learned and cfg.labeler.source != "oracle" and cfg.placement.num_learners == 0:
                # The learner runs here, and Ray starts its workers (the labeling app, the
                # labeler, Serve) at niceness 15: a learner at 0 would starve the page.
                envs.lower_priority(cfg.placement.batch_nice)
            if cfg.placement.num_learners == 0:
                # The learner runs here: give it the threads its placement grants, no more
                # (torch's default, one per core, fights the reward trainer for them).
                import torch

                torch.set_num_threads(max(1, int(cfg.placement.learner.num_cpus)))
            algo = self.algo = build_ppo_config(cfg, relabel=relabel, segments=segments).build_algo()
            if roles is not None:  # its replica started while RLlib built the algorithm
                from rlhf_ray.roles import wait_running

                wait_running(roles.app_name)
            writer = MetricsWriter(self.run_dir)
            self.roles = roles
            if roles is not None and roles.labeling is not None:
                print(f"labeling page: {roles.labeling.url}", file=sys.stderr, flush=True)
                (self.run_dir / "labeling_url.txt").write_text(roles.labeling.url + "\n")
                os.chmod(self.run_dir / "labeling_url.txt", 0o600)  # it carries the token
            # 1. initial labels from the initial policy, then pretraining (or a checkpoint)
            if resume_from is not None:
                self.resume(algo, roles, Path(resume_from))
            elif learned:
                self.initial_labels(algo, roles)
            # 2. the loop
            while True:
                t0 = time.perf_counter()
                result = algo.train()
                t1 = time.perf_counter()
                self.iteration += 1
                env_steps = int(find_metric(result, "num_env_steps_sampled_lifetime") or 0)
                self.env_steps = env_steps
                if learned:
                    if cfg.labeler.source == "mixed":
                        ray.get(roles.labeler.expire_overdue.remote())
                    self.request_labels(roles, env_steps)
                    self.feed_reward_trainer(roles, block=False)
                last = self.metrics(result, env_steps, time.time() - t_start, roles)
                last["ppo_iteration_s"] = round(t1 - t0, 3)
                last["labeling_s"] = round(time.perf_counter() - t1, 3)
                last["sample_s"] = _f(find_metric(result.get("timers", {}), "env_runner_sampling_timer"))
                last["learn_s"] = _f(find_metric(result.get("timers", {}), "learner_update_timer"))
                if learned:
                    last["relabel_s"] = _f(find_metric(result, "rlhf/relabel_s"))
                    last["segment_cut_s"] = _f(find_metric(result, "rlhf/segment_cut_s"))
                    last["rm_train_time_s"] = _f(self.rm_stats.get("rm_train_time_s"))
                writer.write(last)
                if self.on_metrics:
                    self.on_metrics(last)
                if self.progress:
                    print(progress_line(last), flush=True)
                done = env_steps >= cfg.run.total_env_steps or bool(
                    self.stop_event is not None and self.stop_event.is_set())
                if done or (cfg.run.checkpoint_every and self.iteration % cfg.run.checkpoint_every == 0):
                    self.checkpoint(algo, roles)
                if done:
                    break
            if learned and self.train_ref is not None:
                ray.get(self.train_ref)
            return last
        finally:
            if writer is not None:
                writer.close()
            if algo is not None:
                algo.stop()
            stop_roles(roles)
            if started:
                ray.shutdown()

    def initial_labels(self, algo, roles: Roles) -> None:
        import ray

        cfg = self.cfg
        want = self.schedule.initial
        # These env steps come out of the run's budget (the paper counts every interaction),
        # so sample no more than the queries need: one segment per query on average (uniform
        # pairs reuse segments), in calls sized to the segments a rollout batch offers.
        need = min(cfg.labels.pool_size, max(want, 32))
        runners = max(1, cfg.placement.num_env_runners)
        per_call = max(self.seg_len * 4, min(cfg.ppo.train_batch_size // runners,
                                             cfg.labels.segments_per_sample * self.seg_len))
        for calls in range(200):
            size = ray.get(roles.pool.size.remote())
            if size >= need or (calls >= 10 and size < 2):
                break
            sampled = algo.env_runner_group.foreach_env_runner(
                lambda er, n=per_call: sum(len(e) for e in er.sample(num_timesteps=n)),
                local_env_runner=cfg.placement.num_env_runners == 0)
            self.initial_env_steps += int(sum(sampled))
        if ray.get(roles.pool.size.remote()) < 2:
            raise RuntimeError(
                f"initial sampling ({self.initial_env_steps} env steps) produced fewer than 2 "
                f"segments of {self.seg_len} steps: episodes are shorter than a segment; set "
                "labels.segment_length lower or env.remove_termination=true")
        self.submit_queries(roles, want, method="uniform")
        self.feed_reward_trainer(roles, block=True, steps=max(1, cfg.reward_model.pretrain_steps))

    def submit_queries(self, roles: Roles, n: int, method: str) -> None:
        import ray

        cfg = self.cfg
        cand_n = min(cfg.labels.pool_size, max(2 * n * cfg.labels.oversampling, 2))
        cand = ray.get(roles.pool.sample.remote(cand_n))
        if cand is None or len(cand) < 2:
            return
        if method == "variance":
            returns = member_returns(roles.rm_handle, cand)
        else:
            returns = np.zeros((1, len(cand)))
        pairs = select_queries(returns, n, cfg.labels.oversampling, self.rng, method)
        version = int(self.rm_stats.get("rm_version", 0))
        ray.get(roles.labeler.submit.remote(cand.take(pairs[:, 0]), cand.take(pairs[:, 1]), version))
        self.requested += len(pairs)

    def request_labels(self, roles: Roles, env_steps: int) -> None:
        due = self.schedule.due(env_steps, self.requested)
        if due:
            method = self.cfg.labels.query_selection
            self.submit_queries(roles, due, method if self.rm_stats.get("rm_version") else "uniform")

    def feed_reward_trainer(self, roles: Roles, block: bool, steps: int | None = None) -> None:
        """Hand new labels to the trainer; start a training round when the last one is done
        and the labels grew by `reward_model.round_label_growth` since it started (the
        paper's asynchronous reward training, with rounds spaced as the data grows: a round
        per handful of labels costs CPU the rollouts need and moves the reward under PPO's
        critic every iteration)."""
        import ray

        new = ray.get(roles.labeler.drain.remote())
        stats = ray.get(roles.labeler.stats.remote())
        if self.labeler_incarnation not in (None, stats["incarnation"]):
            # the labeler restarted and lost what it had not handed over yet: the store has
            # every acknowledged label, so it becomes the trainer's whole data set again
            stored = ray.get(roles.labeler.stored_comparisons.remote(clear_undrained=True))
            roles.trainer.replace.remote(stored)
            self.labeler_restarts += 1
        elif new is not None:
            roles.trainer.add.remote(new)
        self.labeler_incarnation = stats["incarnation"]
        if self.train_ref is not None:
            ready, _ = ray.wait([self.train_ref], timeout=None if block else 0)
            if not ready:
                return
            self.rm_stats = ray.get(self.train_ref) or self.rm_stats
            self.train_ref = None
        total = stats["labels_total"]
        grown = total - self.labels_at_last_round
        due = grown > 0 and grown >= self.cfg.reward_model.round_label_growth * self.labels_at_last_round
        if due or block:
            self.labels_at_last_round = total
            self.train_ref = roles.trainer.train_and_publish.remote(roles.weight_store, steps)
            if block:
                self.rm_stats = ray.get(self.train_ref)
                self.train_ref = None

    # ------------------------------------------------------------------ resuming
    @staticmethod
    def load_state(ckpt: Path) -> dict:
        try:
            state = json.loads((Path(ckpt) / "controller.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"checkpoint {ckpt}: unreadable controller.json ({exc})") from None
        if state.get("format") != CHECKPOINT_FORMAT or state.get("workload", "control") != "control":
            raise ValueError(f"checkpoint {ckpt}: format {state.get('format')!r} of workload "
                             f"{state.get('workload')!r}; this version reads format "
                             f"{CHECKPOINT_FORMAT} of the control workload")
        return state

    def resume(self, algo, roles: Roles | None, ckpt: Path) -> dict:
        """Continue from a checkpoint: policy, critic and their optimizer (RLlib's checkpoint),
        PPO's KL coefficient, the reward-model ensemble with its normalizers, L2 coefficients
        and version, every stored label (the store is reopened), the query pool, the label
        schedule's position and the RNGs."""
        import ray

        ckpt = Path(ckpt).resolve()
        state = self.load_state(ckpt)
        algo.restore_from_path(str(ckpt / "algo"))
        if state.get("kl_coeffs"):
            set_kl_coeffs(algo, state["kl_coeffs"])
        self.iteration = int(state["iteration"])
        self.env_steps = int(state.get("env_steps", 0))
        self.requested = int(state["labels_requested"])
        self.initial_env_steps = int(state["initial_env_steps"])
        self.rng.bit_generator.state = state["rng"]
        self.rm_stats = dict(state.get("rm_stats") or {})
        self.labels_at_last_round = int(state.get("labels_at_last_round", 0))
        self.seg_len = int(state.get("segment_length", self.seg_len))
        self._truncate_metrics(self.iteration)
        if roles is None:
            return state
        from ray import serve

        from rlhf_ray.reward_model import load_weights
        from rlhf_ray.store import PreferenceStore

        old_app = f"rlhf-rm-{state.get('run_id')}"
        if state.get("run_id") and old_app in serve.status().applications:
            serve.delete(old_app)  # what the dead controller left running
        weights, _, _ = load_weights(str(ckpt / "reward_model.safetensors"))
        ray.get(roles.trainer.restore.remote({k: v.numpy() for k, v in weights.items()},
                                             state["reward_trainer"]))
        stored = ray.get(roles.labeler.stored_comparisons.remote())
        if stored is not None:
            ray.get(roles.trainer.add.remote(stored))
        ray.get(roles.trainer.publish.remote(roles.weight_store))
        if (ckpt / "pool").exists():
            batch = PreferenceStore(str(ckpt / "pool")).segments()
            ray.get(roles.pool.restore.remote({"batch": batch, **state["pool"]}))
        # labels asked for after the checkpoint are in the store (answered) or pending in
        # it: they count against the budget, so the run ends with the same label budget
        st = ray.get(roles.labeler.stats.remote())
        self.requested = max(self.requested, st["labels_total"] + st["labels_pending"])
        return state

    def _truncate_metrics(self, iteration: int) -> None:
        """Rows the dead run wrote after its checkpoint move to metrics.superseded.jsonl: the
        resumed run writes those iterations again."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep, drop = [], []
        for line in path.read_text().splitlines():
            try:
                (keep if json.loads(line)["iteration"] <= iteration else drop).append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                drop.append(line)  # a line cut short by the kill
        if drop:
            with open(self.run_dir / "metrics.superseded.jsonl", "a") as f:
                f.write("\n".join(drop) + "\n")
            path.write_text("".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------ metrics, checkpoints
    def metrics(self, result: dict, env_steps: int, time_s: float, roles: Roles | None) -> dict:
        import ray

        ret = find_metric(result, "episode_return_mean")
        ep_len = find_metric(result, "episode_len_mean")
        m = {
            "iteration": self.iteration,
            "env_steps": env_steps,
            "initial_env_steps": self.initial_env_steps,
            "true_return_mean": _f(ret),
            "episode_len_mean": _f(ep_len),
            "kl_mean": _f(find_metric(result, "mean_kl_loss")),
            "kl_coeff": _f(find_metric(result, "curr_kl_coeff")),
            "time_s": round(time_s, 3),
        }
        if roles is not None:
            pred_r = find_metric(result, "rlhf/pred_reward_mean")
            stats = ray.get(roles.labeler.stats.remote())
            m.update({
                "labels_total": stats["labels_total"],
                "labels_requested": self.requested,
                "labels_by_source": stats["labels_by_source"],
                "labels_pending": stats["labels_pending"],
                "labels_human": sum(v for k, v in stats["labels_by_source"].items()
                                    if k.startswith("human:")),
                "labels_oracle": stats["labels_by_source"].get("oracle", 0),
                "pred_reward_mean": _f(pred_r),
                "pred_return_mean": _f(pred_r * ep_len) if pred_r is not None and ep_len else None,
                "rm_val_accuracy": _f(self.rm_stats.get("rm_val_accuracy")),
                "rm_train_accuracy": _f(self.rm_stats.get("rm_train_accuracy")),
                "rm_val_loss": _f(self.rm_stats.get("rm_val_loss")),
                "rm_train_loss": _f(self.rm_stats.get("rm_train_loss")),
                "rm_l2_mean": _f(self.rm_stats.get("rm_l2_mean")),
                # an iteration without relabelling (its only rollout worker died) keeps the
                # version last seen
                "rm_version": self._rm_version(find_metric(result, "rlhf/rm_version")),
                "rm_version_published": int(self.rm_stats.get("rm_version", 0)),
                "labeler_restarts": self.labeler_restarts,
            })
        else:
            m.update({"labels_total": 0, "pred_return_mean": None, "rm_val_accuracy": None,
                      "rm_version": 0})
        return m

    def _rm_version(self, value) -> int:
        if value is not None and np.isfinite(float(value)):
            self.last_rm_version = int(value)
        return getattr(self, "last_rm_version", 0)

    def checkpoint(self, algo, roles: Roles | None) -> Path:
        import ray

        path = self.run_dir / "checkpoints" / f"iter_{self.iteration:06d}"
        path.mkdir(parents=True, exist_ok=True)
        algo.save_to_path(str((path / "algo").resolve()))
        state = {"format": CHECKPOINT_FORMAT, "workload": "control",
                 "iteration": self.iteration, "env_steps": self.env_steps,
                 "labels_requested": self.requested, "initial_env_steps": self.initial_env_steps,
                 "rng": self.rng.bit_generator.state, "rm_stats": self.rm_stats,
                 "segment_length": self.seg_len, "run_id": self.run_id,
                 "labels_at_last_round": self.labels_at_last_round,
                 # RLlib's checkpoint leaves out PPO's adaptive KL coefficient: keep it here
                 "kl_coeffs": kl_coeffs(algo)}
        if roles is not None:
            snap = ray.get(roles.pool.snapshot.remote())
            if snap["batch"] is not None:  # the query pool, as Parquet (never pickled)
                from rlhf_ray.store import PreferenceStore

                PreferenceStore(str(path / "pool")).write_segments(snap["batch"])
            state["pool"] = {"rng": snap["rng"], "total_added": snap["total_added"]}
            version, weights = ray.get(roles.trainer.weights.remote())
            import torch

            save_weights(str(path / "reward_model.safetensors"),
                         {k: torch.tensor(np.array(v)) for k, v in weights.items()}, roles.spec, version)
            state["reward_trainer"] = ray.get(roles.trainer.state.remote())
        (path / "controller.json").write_text(json.dumps(state, default=_json_default))
        return path


def kl_coeffs(algo) -> dict[str, float]:
    """PPO's current KL coefficient per module (the first learner's: all ranks agree)."""
    out = algo.learner_group.foreach_learner(
        lambda learner: {str(m): float(v) for m, v in learner.curr_kl_coeffs_per_module.items()})
    for result in out:  # RLlib's RemoteCallResults: one CallResult per learner
        return dict(result.get())
    return {}


def set_kl_coeffs(algo, coeffs: dict[str, float]) -> None:
    def put(learner, c=dict(coeffs)):
        for module_id, value in c.items():
            learner.curr_kl_coeffs_per_module[module_id].data.fill_(value)
        return True

    algo.learner_group.foreach_learner(put)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest `checkpoints/iter_*` of a run folder with a complete controller.json."""
    cands = sorted((Path(run_dir) / "checkpoints").glob("iter_*"))
    for c in reversed(cands):
        if (c / "controller.json").exists():
            return c
    return None


def _f(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if not np.isfinite(x) else round(x, 6)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o))


def progress_line(m: dict) -> str:
    def fmt(key, spec):
        v = m.get(key)
        return "-" if v is None else format(v, spec)

    return (f"iter {m['iteration']:4d} | steps {m['env_steps']:>9,} | "
            f"true_return {fmt('true_return_mean', '8.1f')} | pred_return {fmt('pred_return_mean', '8.2f')} | "
            f"labels {m.get('labels_total', 0):5d} | rm_acc {fmt('rm_val_accuracy', '.3f')} | "
            f"rm_v {m.get('rm_version', 0)} | {m['time_s']:.0f}s")


def train(cfg: Config, run_dir: str | None = None,
          on_metrics: Callable[[dict], None] | None = None, progress: bool = True,
          stop_event=None, resume: bool = False) -> Path:
    """Run the whole loop; returns the run folder. Setting `stop_event` (a threading.Event)
    ends the run after the current iteration, with a final checkpoint. `resume`: continue
    `run_dir` from its latest checkpoint."""
    if getattr(cfg, "workload", "control") == "llm":  # one entry point for both workloads
        from rlhf_ray.llm.loop import train as llm_train

        return llm_train(cfg, run_dir, on_metrics=on_metrics, progress=progress, resume=resume)
    ckpt = None
    if resume:
        from rlhf_ray.config import ConfigError

        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(f"--resume {run_dir}: no checkpoint with a controller.json "
                              "under checkpoints/ (run.checkpoint_every sets how often)")
        try:
            state = Controller.load_state(ckpt)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if state.get("env_steps", 0) >= cfg.run.total_env_steps:
            raise ConfigError(f"--resume {run_dir}: the run is complete ({state['env_steps']} "
                              f"env steps >= run.total_env_steps={cfg.run.total_env_steps}); "
                              "raise run.total_env_steps to go on")
    ctl = Controller(cfg, run_dir, on_metrics, progress, stop_event)
    if progress:
        print(f"run folder: {ctl.run_dir}" + (f" (resuming from {ckpt})" if ckpt else ""),
              file=sys.stderr, flush=True)
    ctl.run(resume_from=str(ckpt) if ckpt else None)
    return ctl.run_dir
