"""`ray job submit` against a multi-node cluster of the test's own, started by the helper
users try placement with (`rlhf-ray cluster up`: one raylet per node, distinct custom
resources, own ports, own temp dir). The smoke preset is submitted with the `ray job submit`
client; each role must land on the node the config's placement names; mid-run one node (with
one of the two rollout workers) is taken away; the job must still SUCCEED with its outputs
written, and only the cluster the test started is stopped. Then the README's job lines, as
printed, against a `ray start --head` cluster (token auth on): submit, stop, resume by URI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))

# roles -> nodes: rollouts and the learner on the "rollout" node, the reward model's Serve
# replica and its trainer on the "serving" node, the labeler on the head
PLACEMENT = [
    "placement.num_env_runners=2", "placement.env_runner.resources={rollout: 1}",
    "placement.num_learners=1", "placement.learner.num_cpus=1",
    "placement.learner.resources={learner: 1}",
    "placement.reward_model.resources={serving: 0.5}",
    "placement.reward_trainer.resources={serving: 0.5}",
    "placement.labeler.resources={head: 0.1}"  # also its pool and the weight store,
]
EXPECT = {  # actor class name prefix -> the custom resource its node must have
    "SingleAgentEnvRunner": "rollout",
    "create_executable_class": "learner",  # RLlib's Learner actor wrapper
    "ServeReplica:rlhf-rm-": "serving", "RewardTrainer": "serving", "Labeler": "head",
}


@pytest.fixture()
def own_cluster(s3, tmp_path_factory):
    """Three nodes on this machine, stopped at the end (only these: the helper's process
    group, never anything else)."""
    temp = Path(f"/tmp/rlhfc-test-{uuid.uuid4().hex[:6]}")  # short: raylet socket paths
    info = tmp_path_factory.mktemp("cluster") / "info.json"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_ray.cli", "cluster", "up", "--head", "cpus=1,head=1",
         "--node", "cpus=2,rollout=1,learner=1", "--node", "cpus=1,serving=1",
         "--node", "cpus=1,rollout=1",  # the newest: the one SIGUSR1 takes away
         "--temp-dir", str(temp), "--info", str(info)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while not info.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    if not info.exists():
        proc.kill()
        pytest.fail("cluster up did not start: " + proc.communicate()[0].decode()[-3000:])
    cluster = json.loads(info.read_text())
    from ray.job_submission import JobSubmissionClient

    while True:  # the head's job agent answers a little after the nodes are up
        try:
            JobSubmissionClient(cluster["dashboard"]).list_jobs()
            break
        except Exception:  # noqa: BLE001 - not ready yet
            assert time.time() < deadline + 60, "the dashboard's job API never answered"
            time.sleep(1)
    yield {**cluster, "proc": proc, "info_file": info}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the helper's own group: nodes it started
        proc.wait()
    shutil.rmtree(temp, ignore_errors=True)


def fresh_shell(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`cmd` as a user types it in a new terminal: nothing of this process's environment but
    PATH and HOME. (`rlhf-ray cluster up` nodes run without Ray's token auth: nodes of
    ray.cluster_utils cannot authenticate to their own GCS with RAY_AUTH_MODE=token, measured
    with Ray 2.60; a `ray start --head` cluster needs the client's RAY_AUTH_MODE=token, as
    docs/cluster.md says.)"""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ["HOME"]}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def metrics_rows(run: str) -> list[dict]:
    from rlhf_ray import storage

    for _ in range(10):  # moto's server can miss a key for a moment while it is replaced
        try:
            return [json.loads(x) for x in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
        except FileNotFoundError:
            time.sleep(0.3)
    return []


def submit(dash: str, job_id: str, *entrypoint: str) -> None:
    for _ in range(30):  # "No available agent to submit job, please try again later"
        sub = fresh_shell([
            RAY, "job", "submit", "--address", dash, "--submission-id", job_id, "--no-wait",
            "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps({"env_vars": {"MUJOCO_GL": "egl"}}),
            "--", *entrypoint])
        if sub.returncode == 0 or "No available agent" not in sub.stdout + sub.stderr:
            break
        time.sleep(2)
    assert sub.returncode == 0, sub.stdout + sub.stderr


def test_job_submit_on_s3_places_each_role_and_survives_a_lost_node(s3, own_cluster):
    """The smoke preset submitted as docs/cluster.md prints it, from a fresh shell, its run
    folder on a real S3-protocol server (the cluster's nodes reach it through their
    environment, as pods reach MinIO or S3). Mid-run a rollout node is lost; the job still
    finishes the run, every role on the node its placement names. (The stop and `--resume`
    by a second job are in the README test below.)"""
    from rlhf_ray import storage

    dash = own_cluster["dashboard"]
    bucket = s3("cluster")
    run = f"{bucket}/job"
    job_id = f"rlhf-test-{uuid.uuid4().hex[:6]}"
    submit(dash, job_id, "rlhf-ray", "train", "hopper-smoke", "--quiet",
           f"run.storage_path={bucket}", "run.run_name=job", "run.total_env_steps=10000",
           "run.checkpoint_every=2", *PLACEMENT)
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dash)
    deadline = time.time() + 600
    while not metrics_rows(run):  # the first iteration is done: every role is up
        assert not client.get_job_status(job_id).is_terminal(), client.get_job_logs(job_id)[-3000:]
        assert time.time() < deadline
        time.sleep(0.5)
    own_cluster["proc"].send_signal(signal.SIGUSR1)  # a rollout node is lost mid-run
    while "removed" not in json.loads(own_cluster["info_file"].read_text()):
        assert time.time() < deadline
        time.sleep(0.2)
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    assert status == JobStatus.SUCCEEDED, f"{status}: {client.get_job_logs(job_id)[-4000:]}"
    done = metrics_rows(run)
    assert [r["iteration"] for r in done] == list(range(1, len(done) + 1))
    assert done[-1]["env_steps"] >= 10000 and done[-1]["labels_total"] > 0
    assert storage.is_file(f"{run}/final_eval.json")
    # each role on the node its placement names
    from ray.util.state import list_actors, list_nodes

    lost = set(json.loads(own_cluster["info_file"].read_text())["removed"])
    nodes = {n.node_id: n.resources_total for n in list_nodes(address=dash, detail=True)}
    actors = list_actors(address=dash, detail=True, limit=1000)
    seen = {}
    for a in actors:
        for prefix, resource in EXPECT.items():
            if a.class_name.startswith(prefix):
                if not a.node_id or a.node_id in lost:  # the runner of the lost node
                    assert prefix == "SingleAgentEnvRunner", a
                    continue
                seen.setdefault(prefix, []).append(resource in nodes.get(a.node_id, {}))
    assert set(seen) == set(EXPECT), f"roles not found among actors: {set(EXPECT) - set(seen)}"
    wrong = {k: v for k, v in seen.items() if not all(v)}
    assert not wrong, f"roles on the wrong node: {wrong}"


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def readme_job_lines() -> str:
    """The README's `ray job submit` block, from `export RAY_AUTH_MODE` to the last submit."""
    text = (REPO / "README.md").read_text()
    start = text.index("export RAY_AUTH_MODE=token")
    block = text[start:text.index("```", start)]
    return "\n".join(line for line in block.splitlines() if not line.startswith("rlhf-ray cluster up"))


def test_readme_job_commands_run_as_printed_on_a_ray_start_head_cluster(s3, tmp_path):
    """A head started with `ray start --head` (token auth on, as Ray >= 2.59 does), and the
    README's job lines run as printed -- HEAD and the bucket filled in -- from a fresh shell
    (PATH and HOME only): the run is submitted, its job stopped after its first checkpoint,
    and a second job -- a fresh working dir -- resumes it from the URI: one continuous run,
    no acknowledged label lost or doubled.
    Without the README's `export RAY_AUTH_MODE=token` the same client is refused."""
    from rlhf_ray import storage
    from rlhf_ray.store import PreferenceStore

    gcs, dash, *agents = free_ports(7)
    temp = Path(f"/tmp/rlhfh-{uuid.uuid4().hex[:6]}")  # short: raylet socket paths
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", '--resources={"rollout": 1}',
         f"--temp-dir={temp}", f"--ray-client-server-port={agents[0]}",
         f"--dashboard-agent-listen-port={agents[1]}", f"--dashboard-agent-grpc-port={agents[2]}",
         f"--runtime-env-agent-port={agents[3]}", f"--metrics-export-port={agents[4]}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    bucket = s3("readme")
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
        script = readme_job_lines().replace("http://HEAD:8265", address)
        script = script.replace("s3://bucket/rlhf", bucket).replace("ray job", f"{RAY} job")
        export, *commands = script.replace("\\\n", " ").splitlines()
        assert export.startswith("export RAY_AUTH_MODE=token") and len(commands) == 3, commands
        log, run, acked = "", f"{bucket}/h1", set()
        for i, command in enumerate(commands):
            if i == 1:  # the user stops the job once it has run a while: after a checkpoint
                while not storage.exists(f"{run}/checkpoints/iter_000002/controller.json"):
                    assert time.time() < deadline + 600, log[-3000:]
                    time.sleep(0.5)
            if i == 2:  # stopped: what it had acknowledged
                seen_at_stop = max(2, metrics_rows(run)[-1]["iteration"])
                acked = set(PreferenceStore(f"{run}/preferences").labels()
                            .column("query_id").to_pylist())
                assert acked
            out = subprocess.run(["bash", "-ec", f"{export}\n{command}"], capture_output=True,
                                 text=True, timeout=900, cwd=REPO,
                                 env={"PATH": env["PATH"], "HOME": os.environ["HOME"]})
            log += out.stdout + out.stderr
            assert out.returncode == 0, log[-4000:]
        assert log.count("succeeded") == 1, log[-4000:]  # the job that resumed the run
        # one continuous run: the stopped job's rows after its checkpoint were superseded,
        # and no acknowledged label was lost or stored twice
        rows = metrics_rows(run)
        assert [r["iteration"] for r in rows] == list(range(1, len(rows) + 1)), \
            [(r["iteration"], r["env_steps"], r["time_s"]) for r in rows]
        assert len(rows) > seen_at_stop and rows[-1]["env_steps"] >= 8000
        ids = PreferenceStore(f"{run}/preferences").labels().column("query_id").to_pylist()
        assert len(ids) == len(set(ids)) and acked <= set(ids)
        assert storage.is_file(f"{run}/final_eval.json")
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the nodes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
