"""docs/cluster.md's `ray job submit` lines, as printed from a fresh shell, against a four-node
cluster of the test's own started as users start one (`ray start --head`, then `ray start
--address` per node; token auth on, as Ray >= 2.59 has it): the smoke preset is submitted
with its run folder on a real S3-protocol server, stopped after a checkpoint, resumed by a
second job, and a rollout node is lost while that job runs. Each role must sit on the node
its placement names. Then `rlhf-ray cluster up`, the helper users try placement with on one
machine: its nodes come up with their resources, run a submitted job, and one is taken away
on SIGUSR1. Only the clusters the tests started are stopped."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))

# roles -> nodes: rollouts and the learner on the "rollout" nodes, the reward model's Serve
# replica and its trainer on the "serving" node, the labeler on the head (the docs' line
# names the rollouts' placement; the test appends the rest to it)
PLACEMENT = [
    "placement.num_env_runners=2",
    "placement.num_learners=1", "placement.learner.num_cpus=1",
    "placement.learner.resources={learner: 1}",
    "placement.reward_model.resources={serving: 0.5}",
    "placement.reward_trainer.resources={serving: 0.5}",
    "placement.labeler.resources={head: 0.1}"  # also its pool and the weight store
]
EXPECT = {  # actor class name prefix -> the custom resource its node must have
    "SingleAgentEnvRunner": "rollout",
    "create_executable_class": "learner",  # RLlib's Learner actor wrapper
    "ServeReplica:rlhf-rm-": "serving", "RewardTrainer": "serving", "Labeler": "head",
}
NODES = [  # (CPUs, resources) of the worker nodes; the last is the one lost mid-job
    (2, {"rollout": 1, "learner": 1}), (1, {"serving": 1}), (1, {"rollout": 1})]


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def fresh_shell(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`cmd` as a user types it in a new terminal: nothing of this process's environment but
    PATH and HOME."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ["HOME"]}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def metrics_rows(run: str) -> list[dict]:
    from rlhf_ray.storage import locations

    for _ in range(10):  # moto's server can miss a key for a moment while it is replaced
        try:
            return [json.loads(x) for x in locations.read_text(f"{run}/metrics.jsonl").splitlines()]
        except FileNotFoundError:
            time.sleep(0.3)
    return []


def doc_job_lines() -> str:
    """docs/cluster.md's `ray job submit` block that stops and resumes `h1`, from its
    `export RAY_AUTH_MODE` to the last submit."""
    text = (REPO / "docs" / "cluster.md").read_text()
    end = text.index("--submission-id h1")
    start = text.rindex("export RAY_AUTH_MODE=token", 0, end)
    return text[start:text.index("```", start)].strip()


def state(address: str, what: str) -> list[dict]:
    """Ray's state API (`nodes` or `actors`) from a fresh shell with the docs'
    RAY_AUTH_MODE=token, as `ray list ... --detail` reads it."""
    code = ("import json, sys\nfrom ray.util.state import list_actors, list_nodes\n"
            f"rows = list_{what}(address={address!r}, detail=True, limit=1000)\n"
            "print(json.dumps([{'id': getattr(r, 'node_id', None), 'cls': getattr(r, "
            "'class_name', None), 'res': getattr(r, 'resources_total', None), 'state': r.state}"
            " for r in rows]))")
    out = fresh_shell(["bash", "-c", f"export RAY_AUTH_MODE=token; {shlex.quote(sys.executable)}"
                       f" -c {shlex.quote(code)}"])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_docs_job_lines_on_a_multi_node_cluster_stop_resume_and_lose_a_node(s3):
    """A head started with `ray start --head` and three nodes joined with `ray start
    --address` (token auth on). docs/cluster.md's job lines run as printed -- HEAD and the bucket
    filled in, the placement of the other roles appended to the first submit -- from a fresh
    shell (PATH and HOME only): the run is submitted, its job stopped after its first
    checkpoint, and a second job (a fresh working dir) resumes it from the URI. While that
    job runs, a rollout node is lost (its raylet and workers SIGKILLed, as a machine gone);
    the job still succeeds. One continuous run, no acknowledged label lost or stored twice,
    and every role (env runners, RLlib's learner, the reward model's Serve replica, the
    reward trainer, the labeler) on a node that has the custom resource its placement names.
    Without the docs' `export RAY_AUTH_MODE=token` the same client is refused."""
    from rlhf_ray.storage import locations
    from rlhf_ray.storage.store import PreferenceStore

    temp = Path(f"/tmp/rlhfh-{uuid.uuid4().hex[:6]}")  # short: raylet socket paths
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin")
    env.pop("RAY_ADDRESS", None)
    procs: list[subprocess.Popen] = []

    def ray_start(*args: str, folder: str, token: bool = False) -> subprocess.Popen:
        # every node on its own ports (several share this machine) and its own temp dir
        # (its own session folder: job working dirs unpacked per node)
        listen, metrics, rt_agent, grpc = free_ports(4)
        p = subprocess.Popen(
            [RAY, "start", "--block", *args, f"--temp-dir={temp / folder}",
             f"--dashboard-agent-listen-port={listen}", f"--metrics-export-port={metrics}",
             f"--runtime-env-agent-port={rt_agent}", f"--dashboard-agent-grpc-port={grpc}",
             f"--object-store-memory={200 * 1024 * 1024}", "--disable-usage-stats"],
            env=dict(env, RAY_AUTH_MODE="token") if token else env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    # `ray start --head` turns token auth on only where a token exists (a fresh machine has
    # none: `ray.init` makes one, `ray start` does not): make it, and ask for token auth
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=60)
    gcs, dash, client_port = free_ports(3)
    head = ray_start("--head", f"--port={gcs}", f"--dashboard-port={dash}",
                     "--dashboard-host=127.0.0.1", "--num-cpus=1", '--resources={"head": 1}',
                     f"--ray-client-server-port={client_port}", folder="h", token=True)
    address = f"http://127.0.0.1:{dash}"
    bucket = s3("docs")
    try:
        deadline = time.time() + 120
        while True:  # the head's job API answers a little after `ray start`
            ok = fresh_shell(["bash", "-c", f"export RAY_AUTH_MODE=token; {RAY} job list "
                              f"--address {address}"])
            if ok.returncode == 0:
                break
            assert head.poll() is None and time.time() < deadline, ok.stdout + ok.stderr
            time.sleep(2)
        refused = fresh_shell([RAY, "job", "list", "--address", address])
        assert refused.returncode != 0
        assert "Authentication required" in refused.stdout + refused.stderr
        for i, (cpus, res) in enumerate(NODES):
            ray_start(f"--address=127.0.0.1:{gcs}", f"--num-cpus={cpus}",
                      f"--resources={json.dumps(res)}", folder=f"n{i}", token=True)
        while len([n for n in state(address, "nodes") if n["state"] == "ALIVE"]) < 4:
            assert all(p.poll() is None for p in procs) and time.time() < deadline + 60
            time.sleep(1)
        nodes = {n["id"]: n["res"] for n in state(address, "nodes")}
        lost = [i for i, r in nodes.items() if r.get("rollout") and r.get("CPU") == 1.0]
        assert len(lost) == 1, nodes

        script = doc_job_lines().replace("http://HEAD:8265", address)
        script = script.replace("s3://bucket/rlhf", bucket).replace("ray job", f"{RAY} job")
        export, *commands = script.replace("\\\n", " ").splitlines()
        assert export.startswith("export RAY_AUTH_MODE=token") and len(commands) == 3, commands
        # the other roles' placement, and a checkpoint every iteration: the job is stopped
        # after its first, with three iterations to spare (stopped after the second of
        # checkpoint_every=2, a fast machine finished the run before the stop landed)
        commands[0] += " " + " ".join(shlex.quote(x) for x in
                                      [*PLACEMENT, "run.checkpoint_every=1"])
        log, run = "", f"{bucket}/h1"

        def shell(command: str) -> subprocess.Popen:
            return subprocess.Popen(["bash", "-ec", f"{export}\n{command}"], cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={"PATH": env["PATH"], "HOME": os.environ["HOME"]})

        for i, command in enumerate(commands):
            if i == 1:  # the user stops the job once it has run a while: after a checkpoint
                while not locations.exists(f"{run}/checkpoints/iter_000001/controller.json"):
                    assert time.time() < deadline + 600, log[-3000:]
                    time.sleep(0.5)
            if i == 2:  # stopped: what it had acknowledged
                at_stop = metrics_rows(run)
                seen_at_stop = max(1, at_stop[-1]["iteration"])
                acked = set(PreferenceStore(f"{run}/preferences").labels()
                            .column("query_id").to_pylist())
                assert acked
            proc = shell(command)
            if i == 2:  # the resumed job's first iteration is done: a rollout node is lost
                while all(r in at_stop for r in metrics_rows(run)):
                    assert proc.poll() is None, proc.communicate()[0][-4000:]
                    assert time.time() < deadline + 900
                    time.sleep(0.5)
                os.killpg(procs[-1].pid, signal.SIGKILL)  # its raylet, agents and workers
            out = proc.communicate(timeout=900)[0]
            log += out
            assert proc.returncode == 0, log[-4000:]
        assert log.count("succeeded") == 1, log[-4000:]  # the job that resumed the run
        # one continuous run: the stopped job's rows after its checkpoint were superseded,
        # and no acknowledged label was lost or stored twice
        rows = metrics_rows(run)
        assert [r["iteration"] for r in rows] == list(range(1, len(rows) + 1)), \
            [(r["iteration"], r["env_steps"], r["time_s"]) for r in rows]
        assert len(rows) > seen_at_stop and rows[-1]["env_steps"] >= 8000
        assert rows[-1]["labels_total"] > 0
        ids = PreferenceStore(f"{run}/preferences").labels().column("query_id").to_pylist()
        assert len(ids) == len(set(ids)) and acked <= set(ids)
        assert locations.is_file(f"{run}/final_eval.json")
        # each role of both jobs on the node its placement names
        seen = {}
        for a in state(address, "actors"):
            for prefix, resource in EXPECT.items():
                if a["cls"].startswith(prefix):
                    if not a["id"] or a["id"] in lost:  # the runner of the lost node
                        assert prefix == "SingleAgentEnvRunner", a
                        continue
                    seen.setdefault(prefix, []).append(resource in nodes.get(a["id"], {}))
        assert set(seen) == set(EXPECT), f"roles not found among actors: {set(EXPECT) - set(seen)}"
        wrong = {k: v for k, v in seen.items() if not all(v)}
        assert not wrong, f"roles on the wrong node: {wrong}"
    finally:
        for p in reversed(procs):  # `ray start --block` stops what it started on SIGTERM
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_cluster_up_starts_nodes_with_their_resources_runs_a_job_and_loses_a_node(tmp_path):
    """`rlhf-ray cluster up`: a head and two nodes on this machine, each with its CPUs and
    custom resources; a job submitted to its dashboard runs on this cluster (not on the test
    session's, also on this machine) and sees every node; SIGUSR1 takes the newest node away;
    SIGTERM stops only what it started."""
    temp = Path(f"/tmp/rlhfc-test-{uuid.uuid4().hex[:6]}")  # short: raylet socket paths
    info = tmp_path / "info.json"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_ray.cli", "cluster", "up", "--head", "cpus=1,head=1",
         "--node", "cpus=1,serving=1", "--node", "cpus=1,rollout=1",
         "--temp-dir", str(temp), "--info", str(info)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not info.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert info.exists(), proc.communicate(timeout=60)[0].decode()[-3000:]
        cluster = json.loads(info.read_text())
        assert [n["resources"] for n in cluster["nodes"]] == [
            {"head": 1.0}, {"serving": 1.0}, {"rollout": 1.0}]
        probe = ("import json, ray; ray.init(); print('NODES', json.dumps(sorted("
                 "k for n in ray.nodes() if n['Alive'] for k in n['Resources'] "
                 "if k in ('head', 'serving', 'rollout'))))")
        for _ in range(30):  # "No available agent to submit job, please try again later"
            sub = fresh_shell([RAY, "job", "submit", "--address", cluster["dashboard"], "--",
                               sys.executable, "-c", probe], timeout=300)
            if sub.returncode == 0 or "No available agent" not in sub.stdout + sub.stderr:
                break
            time.sleep(2)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        assert 'NODES ["head", "rollout", "serving"]' in sub.stdout, sub.stdout[-3000:]
        proc.send_signal(signal.SIGUSR1)  # the newest node is lost
        while "removed" not in json.loads(info.read_text()):
            assert proc.poll() is None and time.time() < deadline + 60
            time.sleep(0.2)
        assert json.loads(info.read_text())["removed"] == [cluster["nodes"][-1]["node_id"]]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the helper's own group: nodes it started
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0
