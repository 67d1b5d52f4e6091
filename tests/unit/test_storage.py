"""The storage layer under every run folder (`rlhf_ray.storage`), on a local folder and on a
real S3-protocol server on 127.0.0.1 (moto's), as users point it at MinIO or Ceph."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from rlhf_ray.storage import locations


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3")("unit") + "/run"


def test_files_folders_and_copies(where, tmp_path):
    assert not locations.exists(where) and locations.listdir(where) == []
    locations.write_text(locations.join(where, "a", "x.txt"), "één\n")
    assert locations.read_text(locations.join(where, "a", "x.txt")) == "één\n"
    assert locations.is_dir(locations.join(where, "a")) and locations.is_file(locations.join(where, "a", "x.txt"))
    assert not locations.is_file(locations.join(where, "a"))
    with pytest.raises(FileNotFoundError):
        locations.read_text(locations.join(where, "nothing"))
    # a role's folder: written locally, uploaded when the block ends
    with locations.writable_dir(locations.join(where, "ckpt")) as d:
        os.makedirs(os.path.join(d, "policy"))
        with open(os.path.join(d, "policy", "w.bin"), "wb") as f:
            f.write(b"\x00\x01" * 1000)
        with open(os.path.join(d, "controller.json"), "w") as f:
            f.write("{}")
    assert locations.listdir(locations.join(where, "ckpt")) == ["controller.json", "policy"]
    # ... and read back where it lies (a remote one downloaded once, then the same copy)
    local = locations.local_dir(locations.join(where, "ckpt", "policy"))
    assert open(os.path.join(local, "w.bin"), "rb").read() == b"\x00\x01" * 1000
    assert locations.local_dir(locations.join(where, "ckpt", "policy")) == local
    assert open(locations.local_file(locations.join(where, "ckpt", "controller.json"))).read() == "{}"
    # a folder written again (a run's `final` after a resume, a bucket made anew under an old
    # name) is read as it is now, never from the earlier copy
    time.sleep(1.1)  # object stores keep modification times to the second
    with locations.writable_dir(locations.join(where, "ckpt")) as d:
        os.makedirs(os.path.join(d, "policy"), exist_ok=True)
        with open(os.path.join(d, "policy", "w.bin"), "wb") as f:
            f.write(b"\x02" * 10)
        with open(os.path.join(d, "controller.json"), "w") as f:
            f.write('{"v": 2}')
    again = locations.local_dir(locations.join(where, "ckpt", "policy"))
    assert open(os.path.join(again, "w.bin"), "rb").read() == b"\x02" * 10
    assert open(locations.local_file(locations.join(where, "ckpt", "controller.json"))).read() == '{"v": 2}'
    # a block that fails uploads nothing
    with pytest.raises(RuntimeError):
        with locations.writable_dir(locations.join(where, "broken")) as d:
            open(os.path.join(d, "half"), "w").write("x")
            raise RuntimeError("killed")
    if locations.is_remote(where):
        assert not locations.exists(locations.join(where, "broken"))


def test_a_mirror_pushes_only_what_changed_and_pulls_all_but_the_roles_folders(s3, tmp_path):
    remote = s3("mirror") + "/run"
    local = tmp_path / "work"
    (local / "tb").mkdir(parents=True)
    (local / "metrics.jsonl").write_text('{"iteration": 1}\n')
    (local / "tb" / "events").write_bytes(b"e1")
    (local / "checkpoints").mkdir()
    (local / "checkpoints" / "skip.me").write_text("x")
    m = locations.Mirror(local, remote, exclude=("checkpoints",))
    assert m.push() == 2 and m.push() == 0
    with open(local / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 2}\n')
    assert m.push() == 1
    assert locations.read_text(remote + "/metrics.jsonl").count("\n") == 2
    assert not locations.exists(remote + "/checkpoints")
    locations.write_text(remote + "/checkpoints/iter_1/controller.json", "{}")
    other = locations.Mirror(tmp_path / "elsewhere", remote)
    other.pull(skip=("checkpoints",))
    got = sorted(str(p.relative_to(tmp_path / "elsewhere")) for p in (tmp_path / "elsewhere").rglob("*")
                 if p.is_file())
    assert got == ["metrics.jsonl", "tb/events"]


def test_a_bucket_that_does_not_exist_is_refused_in_one_line(s3):
    with pytest.raises(locations.StorageError) as e:
        locations.check("s3://no-such-bucket/runs/r1")
    assert str(e.value) == "run.storage_path=s3://no-such-bucket/runs/r1: bucket 'no-such-bucket' does not exist"
    locations.check(s3("fine") + "/r1")  # writes and removes a probe
    locations.check("/tmp/anything")  # local folders are made as needed


def test_an_endpoint_that_does_not_answer_is_refused_in_one_line(s3, monkeypatch):
    bucket = s3("down")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    saved = dict(locations._FS)
    locations._FS.clear()
    try:
        with pytest.raises(locations.StorageError, match=r"^run.storage_path=s3://down-\d+/r: "
                                                       r"the endpoint does not answer") as e:
            locations.check(bucket + "/r")
        assert "\n" not in str(e.value)
    finally:
        locations._FS.clear()
        locations._FS.update(saved)


def test_refused_credentials_are_named(tmp_path):
    """A second S3 server that checks signatures (moto with authentication on): keys it
    does not know are refused, and the error says it is the credentials."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-c", "import time; from moto.server import ThreadedMotoServer as T; "
         f"T(ip_address='127.0.0.1', port={port}).start(); time.sleep(120)"],
        env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        code = ("from rlhf_ray.storage import locations\n"
                "try:\n    locations.check('s3://locked/r')\n"
                "except locations.StorageError as e:\n    print(e)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env=dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                                                  AWS_ACCESS_KEY_ID="unknown",
                                                  AWS_SECRET_ACCESS_KEY="wrong",
                                                  AWS_EC2_METADATA_DISABLED="true"))
        assert out.stdout.startswith("run.storage_path=s3://locked/r: credentials missing or "
                                     "refused"), out.stdout + out.stderr
    finally:
        server.kill()
