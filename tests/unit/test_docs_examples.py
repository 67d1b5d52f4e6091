"""Every example and every command the docs print is checked, so that a printed example can
never again be refused: each `rlhf-ray ...` line of a shell block in README.md, docs/ and the
folders' READMEs (and each one a `ray job submit ... --` line runs) is parsed by the CLI's
own parser, its config resolved with its overrides, its stage found in its workload, its
sweep file loaded; each `examples/` config loads; and every KubeRay manifest offers the
resources the configs it runs ask for (a role whose resources no pod has waits forever)."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from rlhf_ray import workloads
from rlhf_ray.cli import build_parser
from rlhf_ray.config import apply_overrides, load_config
from rlhf_ray.errors import ConfigError
from rlhf_ray.runtime.placement import bundle_of
from rlhf_ray.runtime.sections import RoleResources

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
        *sorted(ROOT.glob("*/README.md"))]
SHELL = {"", "bash", "sh", "shell", "console"}
ENV = {"LABEL_TOKEN": "0123456789abcdef0123456789abcdef"}  # what a doc's `export` would set


def shell_lines(text: str) -> list[tuple[int, str]]:
    """The logical lines (continuations joined) of a Markdown file's shell code blocks."""
    out, block, pending, start = [], None, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```(\w*)", line)
        if fence:
            block = None if block is not None else fence.group(1)
            continue
        if block is None or block not in SHELL:
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def yaml_comment_lines(text: str) -> list[tuple[int, str]]:
    """Commands shown in a YAML file's comments (`#   rlhf-ray train ...`)."""
    return [(n, line.lstrip()[1:]) for n, line in enumerate(text.splitlines(), 1)
            if line.lstrip().startswith("#")]


def rlhf_argv(line: str) -> list[str] | None:
    """The `rlhf-ray` arguments of a shell line: the line itself, or what a `ray job submit
    ... --` runs. None for any other line."""
    for name, value in ENV.items():
        line = line.replace(f"${name}", value)
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    if tokens[:1] == ["rlhf-ray"]:
        return tokens[1:]
    if tokens[:3] == ["ray", "job", "submit"] and "--" in tokens:
        tail = tokens[tokens.index("--") + 1:]
        return tail[1:] if tail[:1] == ["rlhf-ray"] else None
    return None


def check_command(argv: list[str]):
    """What `rlhf-ray` would refuse before anything starts, raised: an unparsable line, a
    config or override the loader refuses, a stage its workload lacks, a sweep file that
    does not load. Returns the resolved config where the command names one."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit:
        raise AssertionError(f"the CLI refuses: rlhf-ray {shlex.join(argv)}") from None
    if extra:  # as main(): key=value overrides may follow options
        assert hasattr(args, "overrides") and all("=" in e and not e.startswith("-")
                                                  for e in extra), f"unrecognized: {extra}"
        args.overrides = list(args.overrides) + extra
    cmd = args.command
    if cmd in ("train", "sft", "rm", "ppo"):
        if getattr(args, "resume", None):
            if args.config:  # `--resume RUN override`: the first override lands in config
                assert "=" in args.config, "train --resume RUN_DIR takes no preset"
            apply_overrides({}, ([args.config] if args.config else []) + args.overrides)
            return None
        cfg = load_config(args.config, args.overrides)
        if cmd != "train":
            assert cmd in workloads.of(cfg).stages, f"{cmd}: not a stage of {cfg.workload}"
        return cfg
    if cmd == "presets" and args.show:
        return load_config(args.show)
    if cmd == "sweep" and args.sweep_file and not args.resume:
        from rlhf_ray.sweep.spec import load_sweep

        load_sweep(args.sweep_file, args.overrides)
    if cmd == "models":
        from rlhf_ray.llm import assets

        if args.preset:
            load_config(args.preset)
        if args.action == "get":
            assert set(args.names) <= set(assets.ASSETS), args.names
    return None


def documented_commands():
    for path in DOCS:
        for n, line in shell_lines(path.read_text()):
            argv = rlhf_argv(line)
            if argv is not None:
                yield pytest.param(argv, id=f"{path.relative_to(ROOT)}:{n}")
    for path in [*sorted((ROOT / "examples").rglob("*.yaml")),
                 *sorted((ROOT / "k8s").glob("*.yaml")),
                 *sorted((ROOT / "cluster").glob("*.yaml"))]:
        for n, line in yaml_comment_lines(path.read_text()):
            argv = rlhf_argv(line)
            if argv is not None:
                yield pytest.param(argv, id=f"{path.relative_to(ROOT)}:{n}")
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                yield pytest.param(rlhf_argv(doc["spec"]["entrypoint"]),
                                   id=f"{path.relative_to(ROOT)}:entrypoint")


COMMANDS = list(documented_commands())


def inline_commands():
    """`rlhf-ray ...` in running text: a synopsis (with `[`, `|`, `...` or `NAME`-style
    placeholders) is a pattern, not a command; the rest must parse."""
    for path in DOCS:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for span in re.findall(r"`(rlhf-ray [^`]+)`", line):
                if not re.search(r"[\[|]|\.\.\.|<", span):
                    yield pytest.param(shlex.split(span)[1:], id=f"{path.relative_to(ROOT)}:{n}")


@pytest.mark.parametrize("argv", list(inline_commands()))
def test_every_command_in_running_text_parses(argv):
    """A whole command must parse; a mention of one (`rlhf-ray store compact`) must name a
    command, actions and options the CLI has."""
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert argv[0] in sub.choices, f"no command {argv[0]!r}"
    cmd = sub.choices[argv[0]]
    options = {o for a in cmd._actions for o in a.option_strings}
    assert all(t.split("=")[0] in options for t in argv if t.startswith("-")), argv
    choices = [a.choices for a in cmd._actions if not a.option_strings and a.choices]
    if choices and len(argv) > 1 and not argv[1].startswith("-"):
        assert argv[1] in choices[0], argv
    try:
        _, extra = parser.parse_known_args(argv)
        assert not extra or all("=" in e for e in extra), extra
    except SystemExit:  # a mention without its arguments
        pass


@pytest.mark.parametrize("argv", COMMANDS)
def test_every_documented_command_is_accepted(argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' paths are relative to the repository
    check_command(argv)


def test_the_check_catches_what_the_config_refuses(monkeypatch):
    """The old README's multi-learner line: the default minibatch does not split over 4."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        check_command(rlhf_argv("rlhf-ray train llm-tiny placement.num_learners=4"))
    with pytest.raises(ConfigError, match="does not exist"):
        check_command(rlhf_argv("rlhf-ray train my_llm.yaml"))
    with pytest.raises(AssertionError, match="not a stage"):
        check_command(rlhf_argv("rlhf-ray sft hopper"))
    assert rlhf_argv("ray job submit --address http://h:8265 -- rlhf-ray train hopper  # c") == [
        "train", "hopper"]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_config_loads(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(str(path.relative_to(ROOT)))
    if cfg.workload == "llm":  # the data files it names are there and read
        from rlhf_ray.llm.data import load_preferences, load_prompts, load_sft

        assert len(load_prompts(cfg)) >= 10 and len(load_sft(cfg)) >= 10
        assert len(load_preferences(cfg.data.preferences_path)) >= 10


def test_a_users_own_model_gets_nothing_of_the_toy_task(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config("examples/own_model.yaml")
    assert cfg.data.task is None and cfg.labeler.oracle is None and cfg.eval.yardstick is None
    for n in (1, 2, 4, 8):  # its batch sizes split over any of these learner counts
        load_config("examples/own_model.yaml", [f"placement.num_learners={n}"])
    # online labels with neither an oracle nor people: one line naming what to set
    with pytest.raises(ConfigError, match=r"^labeler.oracle: none, but labeler.source=oracle"):
        load_config("examples/own_model.yaml", ["labels.per_iteration=4"])
    with pytest.raises(ConfigError, match=r"^labeler.oracle: none, but labeler.source=mixed"):
        load_config("examples/own_model.yaml", ["labeler.source=mixed"])
    load_config("examples/own_model.yaml", ["labels.per_iteration=4", "labeler.source=human"])
    with pytest.raises(ConfigError, match=r"^data.prompts_path: required"):
        load_config("examples/own_model.yaml", ["data.prompts_path=null"])
    bare = {"workload": "llm", "data": {"prompts_path": "p.jsonl", "sft_path": "s.jsonl"},
            "labeler": {"source": "human"}}
    from rlhf_ray.config import validate

    cfg = validate(bare)
    assert cfg.data.task is None and cfg.labeler.oracle is None and cfg.eval.yardstick is None


# --- KubeRay: the pods offer what the roles of the configs they run ask for ---------------

def pod_offers(group: dict) -> dict[str, float]:
    params = group.get("rayStartParams") or {}
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    offer = {"CPU": float(params.get("num-cpus", limits.get("cpu", 0))),
             "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
    if params.get("resources"):
        offer.update(json.loads(json.loads(params["resources"])))  # KubeRay: a quoted JSON
    return offer


def role_demands(cfg) -> dict[str, dict[str, float]]:
    """Every role's resources in a config's placement section."""
    return {name: bundle_of(res) for name, res in cfg.placement if isinstance(res, RoleResources)}


def unplaceable(cfg, groups: list[dict]) -> list[str]:
    offers = [pod_offers(g) for g in groups]
    return [f"{role} {need}" for role, need in role_demands(cfg).items()
            if any(v > 0 for v in need.values())
            and not any(all(o.get(k, 0) >= v for k, v in need.items()) for o in offers)]


def cluster_groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def manifest_runs():
    """(manifest, the pod groups, the commands that run on it)."""
    paths = [*sorted((ROOT / "k8s").glob("*.yaml")), *sorted((ROOT / "examples").rglob("*.yaml"))]
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == "RayJob":
                yield pytest.param(cluster_groups(doc["spec"]["rayClusterSpec"]),
                                   [rlhf_argv(doc["spec"]["entrypoint"])], id=path.name)
            elif doc.get("kind") == "RayCluster":  # the jobs its comments and k8s/README submit
                lines = yaml_comment_lines(path.read_text()) + shell_lines(
                    (ROOT / "k8s" / "README.md").read_text())
                argvs = [a for _, line in lines if (a := rlhf_argv(line)) is not None]
                yield pytest.param(cluster_groups(doc["spec"]), argvs, id=path.name)


@pytest.mark.parametrize("groups,argvs", list(manifest_runs()))
def test_kuberay_pods_offer_what_the_roles_they_run_ask_for(groups, argvs, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert argvs
    for argv in argvs:
        cfg = check_command(argv)
        assert cfg is not None and unplaceable(cfg, groups) == [], shlex.join(argv)


def test_the_placement_check_sees_a_role_no_pod_can_hold(monkeypatch):
    monkeypatch.chdir(ROOT)
    doc = yaml.safe_load((ROOT / "k8s" / "raycluster.yaml").read_text())
    cfg = load_config("hopper", ["placement.env_runner.resources={rollout: 1}"])
    assert unplaceable(cfg, cluster_groups(doc["spec"])) == []
    for g in doc["spec"]["workerGroupSpecs"]:
        g["rayStartParams"] = {}  # as the manifest was: nothing carries `rollout`
    [missing] = unplaceable(cfg, cluster_groups(doc["spec"]))
    assert missing.startswith("env_runner") and "'rollout': 1.0" in missing
    gpu = load_config("hopper", ["placement.num_learners=1", "placement.learner.num_gpus=2"])
    assert "learner" in unplaceable(gpu, cluster_groups(doc["spec"]))[0]


def test_the_image_holds_what_the_manifests_run():
    docker = (ROOT / "cluster" / "Dockerfile").read_text()
    for folder in ("rlhf_ray", "serve", "tune_configs", "examples"):
        assert f"COPY --chown=ray {folder} ./{folder}" in docker
    assert "LICENSE" in docker and os.path.exists(ROOT / "LICENSE")


def test_the_launcher_nodes_offer_what_the_roles_they_run_ask_for(monkeypatch):
    """`cluster/aws-gpu.yaml`'s node types against the commands its comments submit."""
    monkeypatch.chdir(ROOT)
    path = ROOT / "cluster" / "aws-gpu.yaml"
    nodes = yaml.safe_load(path.read_text())["available_node_types"].values()
    groups = [{"rayStartParams": {"num-cpus": n["resources"].get("CPU", 0),
                                  "num-gpus": n["resources"].get("GPU", 0),
                                  "resources": json.dumps(json.dumps(
                                      {k: v for k, v in n["resources"].items()
                                       if k not in ("CPU", "GPU")}))},
               "template": {"spec": {"containers": [{"resources": {"limits": {}}}]}}}
              for n in nodes]
    argvs = [a for _, line in yaml_comment_lines(path.read_text())
             if (a := rlhf_argv(line)) is not None]
    assert len(argvs) >= 2
    for argv in argvs:
        assert unplaceable(check_command(argv), groups) == [], shlex.join(argv)


def test_every_record_the_results_cite_is_there():
    """The README's figures point to docs/results/README.md, whose figures each name a record
    in docs/results/ (a glob where one names several): every one must exist."""
    readme = (ROOT / "README.md").read_text()
    assert "docs/results/README.md" in readme
    results = ROOT / "docs" / "results"
    cited = set(re.findall(r"`([\w.*-]+\.(?:json|md|png))`", (results / "README.md").read_text()))
    cited |= {m.removeprefix("docs/results/") for m in
              re.findall(r"docs/results/[\w.*-]+\.(?:json|md|png)", readme)}
    assert len(cited) >= 20
    missing = sorted(c for c in cited if not list(results.glob(c)))
    assert missing == []
