"""Where a run's files live: a local folder or an object-store URI (`s3://`, `gs://`), one
layer for all of it (pyarrow.fs, the layer the preference store, Ray Train and Tune use).

A location is a string: a local path, or `scheme://bucket/key`. `file://` URIs are local
paths. S3 takes its endpoint, region and credentials from the environment as the AWS SDK does
(`AWS_ENDPOINT_URL` for MinIO, Ceph or a test server; `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY`), so every process of a run -- on any node -- opens the same bucket.

Roles never hold a remote folder open: `writable_dir(target)` gives a local folder to write
into and uploads it on exit; `local_dir(source)` downloads a remote folder once per machine
and version of its files (a folder written again is downloaded again) and returns where it
lies. For local locations both are the location itself, so local runs copy nothing.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from rlhf_ray.errors import StorageError


def is_remote(location: str | os.PathLike | None) -> bool:
    s = str(location or "")
    return "://" in s and not s.startswith("file://")


def normalize(location: str | os.PathLike) -> str:
    """A local path (absolute; `file://` stripped) or a remote URI without a trailing slash."""
    s = str(location)
    if s.startswith("file://"):
        s = s[len("file://"):]
    if is_remote(s):
        return s.rstrip("/")
    return os.path.abspath(os.path.expanduser(s))


def join(location: str, *parts: str) -> str:
    if is_remote(location):
        return posixpath.join(location.rstrip("/"), *parts)
    return os.path.join(location, *parts)


def name(location: str) -> str:
    return posixpath.basename(str(location).rstrip("/"))


_FS: dict[str, pafs.FileSystem] = {}
_LOCK = threading.Lock()


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it); one filesystem object per scheme and bucket."""
    loc = normalize(location)
    if not is_remote(loc):
        return pafs.LocalFileSystem(), loc
    scheme, rest = loc.split("://", 1)
    key = f"{scheme}://{rest.split('/', 1)[0]}"
    with _LOCK:
        fs = _FS.get(key)
        if fs is None:
            try:
                fs, _ = pafs.FileSystem.from_uri(loc)
            except (OSError, ValueError) as exc:
                raise StorageError(f"{loc}: cannot open ({_first_line(exc)})") from None
            _FS[key] = fs
    return fs, rest


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check(location: str, what: str = "run.storage_path") -> None:
    """Refuse, in one line naming the URI and the cause, a location a run cannot write to: a
    bucket that does not exist, missing credentials, an endpoint that does not answer. Writes
    and removes one small object."""
    loc = normalize(location)
    if not is_remote(loc):
        return
    fs, path = filesystem(loc)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{what}={loc}: bucket {bucket!r} does not exist")
        probe = posixpath.join(path, f".rlhf-ray-probe-{os.getpid()}")
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the SDK says, on one line
        msg = _first_line(exc)
        low = msg.lower()
        if any(w in low for w in ("credential", "access denied", "access_denied",
                                  "accessdenied", "signature", "invalidaccesskeyid",
                                  "forbidden", "403")):
            cause = f"credentials missing or refused ({msg})"
        elif "curl" in low or "connect" in low or "timeout" in low or "resolve" in low:
            cause = f"the endpoint does not answer ({msg})"
        else:
            cause = msg
        raise StorageError(f"{what}={loc}: {cause}") from None


# ---------------------------------------------------------------------- files
def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(location: str) -> bool:
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        return True
    if isinstance(fs, pafs.LocalFileSystem):
        return False
    # object stores have no folders: a prefix with objects under it is one
    return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def listdir(location: str) -> list[str]:
    """Names directly under a folder (empty where there is none)."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(2, "No such file", str(location)) from None
        raise


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str, data: bytes) -> None:
    """The whole object at once (local: a temporary file renamed into place)."""
    fs, path = filesystem(location)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def delete(location: str) -> None:
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)
    elif info.type == pafs.FileType.Directory or is_dir(location):
        fs.delete_dir(path)


# ---------------------------------------------------------------------- folders
def _copy_tree(src_fs: pafs.FileSystem, src: str, dst_fs: pafs.FileSystem, dst: str) -> None:
    """Every file under `src` to the same relative path under `dst`, streamed in 16 MiB
    pieces. Not `pyarrow.fs.copy_files`: it holds the GIL while it waits on the network, so
    an S3 server answering from a thread of the same process (moto's, in the tests) can
    never answer it."""
    src = src.rstrip("/")
    infos = src_fs.get_file_info(pafs.FileSelector(src, recursive=True))
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(src):].lstrip("/")
        target = f"{dst.rstrip('/')}/{rel}"
        if isinstance(dst_fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        with src_fs.open_input_stream(info.path) as fin, dst_fs.open_output_stream(target) as fout:
            while True:
                piece = fin.read(16 << 20)
                if not piece:
                    break
                fout.write(piece)


def upload_dir(local: str | os.PathLike, target: str) -> None:
    """Copy a local folder's files to `target` (a remote folder), overwriting."""
    fs, path = filesystem(target)
    _copy_tree(pafs.LocalFileSystem(), os.path.abspath(local), fs, path)


def download_dir(source: str, local: str | os.PathLike) -> None:
    fs, path = filesystem(source)
    if not is_dir(source):
        raise FileNotFoundError(2, "No such folder", source)
    os.makedirs(local, exist_ok=True)
    _copy_tree(fs, path, pafs.LocalFileSystem(), os.path.abspath(local))


@contextmanager
def writable_dir(target: str):
    """A local folder to write `target`'s contents into; a remote target gets them uploaded
    when the block ends without an error."""
    if not is_remote(target):
        os.makedirs(normalize(target), exist_ok=True)
        yield normalize(target)
        return
    tmp = tempfile.mkdtemp(prefix="rlhf-up-")
    try:
        yield tmp
        upload_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_RAY_CACHE", Path.home() / ".cache" / "rlhf-ray")) / "remote"


def _cache_path(loc: str) -> Path:
    """Where the copy of `loc` as it is now lies: keyed by the location and by its files'
    sizes and modification times, so a location written again (a run's `final` checkpoint
    after a resume, a bucket made anew under an old name) is downloaded again, never read
    stale from an earlier copy."""
    fs, path = filesystem(loc)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        files = [("", info.size, info.mtime_ns)]
    else:
        files = sorted((i.path, i.size, i.mtime_ns) for i in fs.get_file_info(
            pafs.FileSelector(path, recursive=True, allow_not_found=True))
            if i.type == pafs.FileType.File)
    key = hashlib.sha1(loc.encode()).hexdigest()[:16]
    version = hashlib.sha1(repr(files).encode()).hexdigest()[:12]
    return cache_root() / f"{key}-{version}-{name(loc)}"


def local_dir(source: str) -> str:
    """A local folder with `source`'s files: the folder itself where it is local, else a copy
    downloaded once per machine and version of its files."""
    if not is_remote(source):
        return normalize(source)
    loc = normalize(source)
    dest = _cache_path(loc)
    done = dest / ".rlhf-ray-complete"
    if not done.exists():
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=_mkdir(cache_root())))
        download_dir(loc, tmp)
        (tmp / ".rlhf-ray-complete").write_text(loc)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def local_file(source: str) -> str:
    """A local path of one file (downloaded once per machine and version where remote)."""
    if not is_remote(source):
        return normalize(source)
    loc = normalize(source)
    dest = _cache_path(loc)
    if not dest.exists():
        _mkdir(cache_root())
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        tmp.write_bytes(read_bytes(loc))
        os.replace(tmp, dest)
    return str(dest)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


class Mirror:
    """A remote folder's local working copy on the driver: files the driver appends to or
    rewrites (metrics, TensorBoard events, the driver log, reports) are written here and
    `push()`ed -- only those changed since the last push."""

    def __init__(self, local: str | os.PathLike, remote: str, exclude: tuple[str, ...] = ()):
        self.local, self.remote, self.exclude = Path(local), remote, exclude
        self._seen: dict[str, tuple[int, int]] = {}

    def push(self) -> int:
        n = 0
        for root, dirs, files in os.walk(self.local):
            rel_root = os.path.relpath(root, self.local)
            if rel_root != "." and rel_root.split(os.sep)[0] in self.exclude:
                dirs[:] = []
                continue
            if rel_root == ".":
                dirs[:] = [d for d in dirs if d not in self.exclude]
            for fn in files:
                p = os.path.join(root, fn)
                rel = os.path.normpath(os.path.join(rel_root, fn)).replace(os.sep, "/")
                if rel.split("/")[0] in self.exclude or ".tmp-" in fn:
                    continue
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                sig = (st.st_size, st.st_mtime_ns)
                if self._seen.get(rel) == sig:
                    continue
                with open(p, "rb") as f:
                    write_bytes(join(self.remote, rel), f.read())
                self._seen[rel] = sig
                n += 1
        return n

    def pull(self, skip: tuple[str, ...] = ()) -> None:
        """The remote folder's files into the working copy, except the top-level folders in
        `skip` (checkpoints, the store: read where they lie)."""
        fs, path = filesystem(self.remote)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(path):].lstrip("/")
            if rel.split("/")[0] in skip:
                continue
            dest = self.local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as f:
                dest.write_bytes(f.read())
            st = os.stat(dest)
            self._seen[rel] = (st.st_size, st.st_mtime_ns)
