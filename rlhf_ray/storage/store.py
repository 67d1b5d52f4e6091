"""The preference store: every label and the segments it compares, as Parquet part files.

Layout under the storage path (a local folder, or s3:// / gs:// through pyarrow.fs):

    preferences/segments/part-<time>-<uuid>.parquet   segment arrays (written before labels)
    preferences/labels/part-<time>-<uuid>.parquet     one row per answered query (a ranking
                                                      of K items: its C(K,2) pairs, one ranking_id)
    preferences/queries/part-<time>-<uuid>.parquet    every query asked, answered or not
    preferences/texts/part-<time>-<uuid>.parquet      prompts and responses (LLM comparisons)
    preferences/clips/<segment id>.webm               rendered clips (a cache: safe to delete)
    preferences/quarantine/<table>/...                parts `rlhf-ray store check --quarantine`
                                                      moved aside (kept, never deleted)

Part files are immutable; a write is one new part. A label is durable before it is
acknowledged: on a local disk the part is written to a hidden temp file, fsynced and renamed
into place (then the folder is fsynced); on object stores a PUT is atomic and durable when it
returns. Readers ignore temp files, so a crash between write and rename leaves nothing
half-read. Reopening the store gives back every acknowledged label, deduplicated by query id
(a label written twice -- a retry after a crash before the acknowledgement -- counts once).

Labels arrive one part per answer, so a long run leaves thousands of small parts;
`compact()` (`rlhf-ray store compact RUN_DIR`) merges each table's parts into one. It writes
the merged part durably first and only then deletes the parts it merged, so a crash in
between leaves rows twice, which readers already count once; parts written meanwhile are
left alone, and a reader that finds a listed part gone lists again.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rlhf_ray.core.segments import SegmentBatch
from rlhf_ray.errors import StoreError

LABEL_SCHEMA = pa.schema([
    ("query_id", pa.string()),
    ("left_id", pa.string()),
    ("right_id", pa.string()),
    ("label", pa.string()),  # left | right | equal | skip
    ("mu", pa.float64()),  # the paper's mu(left); null for skip
    ("source", pa.string()),  # oracle | human:<labeler id>
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("labeled_at", pa.timestamp("us", tz="UTC")),
    ("rm_version", pa.int64()),
    ("ranking_id", pa.string()),  # null, or the ranking query this pair was derived from
])
QUERY_SCHEMA = pa.schema([
    ("query_id", pa.string()),
    ("kind", pa.string()),  # clip | text | ranking
    ("item_ids", pa.list_(pa.string())),  # 2 segment/text ids, or K for a ranking
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("rm_version", pa.int64()),
])
TEXT_SCHEMA = pa.schema([
    ("text_id", pa.string()),
    ("prompt", pa.string()),
    ("response", pa.string()),
    # whether the policy ended the response (EOS) or it was cut at the length limit; stores
    # written before the column existed read as ended
    ("finished", pa.bool_()),
])
MU = {"left": 1.0, "right": 0.0, "equal": 0.5, "skip": None}


def _segment_rows(f, want: set[str] | None, batch_rows: int = 32
                  ) -> dict[str, tuple[int, dict[str, np.ndarray]]]:
    """The wanted segments (all when None) of one Parquet part: its ids are read first, and
    its arrays only if it holds one, `batch_rows` rows at a time."""
    pf = pq.ParquetFile(f)
    if want is not None and not want.intersection(
            pf.read(columns=["segment_id"]).column("segment_id").to_pylist()):
        return {}
    meta = json.loads(pf.schema_arrow.metadata[b"rlhf_ray.arrays"])
    found = {}
    for batch in pf.iter_batches(batch_size=batch_rows,
                                 columns=["segment_id", "env_steps", *meta]):
        sid = batch.column("segment_id").to_pylist()
        rows = [i for i, s in enumerate(sid) if want is None or s in want]
        if not rows:
            continue
        sub = batch.take(pa.array(rows, type=pa.int64()))
        steps = sub.column("env_steps").to_pylist()
        cols = {name: sub.column(name).to_pylist() for name in meta}
        for j, i in enumerate(rows):
            found[sid[i]] = (steps[j], {
                name: np.frombuffer(cols[name][j], dtype=np.dtype(m["dtype"])).reshape(m["shape"])
                for name, m in meta.items()})
    return found


@dataclass
class Label:
    query_id: str
    left_id: str
    right_id: str
    label: str
    source: str
    created_at: float
    labeled_at: float
    rm_version: int
    ranking_id: str | None = None

    def row(self) -> dict:
        if self.label not in MU:
            raise ValueError(f"label {self.label!r}: must be one of left, right, equal, skip")
        return {
            "query_id": self.query_id, "left_id": self.left_id, "right_id": self.right_id,
            "label": self.label, "mu": MU[self.label], "source": self.source,
            "created_at": int(self.created_at * 1e6), "labeled_at": int(self.labeled_at * 1e6),
            "rm_version": int(self.rm_version), "ranking_id": self.ranking_id,
        }


@dataclass
class QueryRecord:
    query_id: str
    kind: str
    item_ids: list[str]
    created_at: float
    rm_version: int

    def row(self) -> dict:
        return {"query_id": self.query_id, "kind": self.kind, "item_ids": list(self.item_ids),
                "created_at": int(self.created_at * 1e6), "rm_version": int(self.rm_version)}


def _open_fs(root: str) -> tuple[pafs.FileSystem, str, bool]:
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
        return fs, path.rstrip("/"), isinstance(fs, pafs.LocalFileSystem)
    return pafs.LocalFileSystem(), os.path.abspath(root), True


class PreferenceStore:
    def __init__(self, root: str):
        self.root = root
        self.fs, self.base, self.local = _open_fs(root)
        for sub in ("labels", "segments", "queries", "texts", "clips"):
            self.fs.create_dir(f"{self.base}/{sub}", recursive=True)

    # ------------------------------------------------------------------ writing
    def _write(self, sub: str, table: pa.Table, name: str | None = None) -> str:
        name = name or f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        final = f"{self.base}/{sub}/{name}"
        if not self.local:
            with self.fs.open_output_stream(final) as out:
                pq.write_table(table, out)
            return final
        tmp = f"{self.base}/{sub}/.tmp-{name}"
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self._fsync_dir(sub)
        return final

    def _fsync_dir(self, sub: str) -> None:
        """Make renames and deletes in a local table folder durable."""
        dir_fd = os.open(f"{self.base}/{sub}", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def write_segments(self, batch: SegmentBatch) -> str:
        cols: dict[str, pa.Array] = {
            "segment_id": pa.array(batch.ids, pa.string()),
            "env_steps": pa.array(batch.env_steps.astype(np.int64)),
        }
        meta = {}
        for name, arr in batch.arrays.items():
            arr = np.ascontiguousarray(arr)
            meta[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape[1:])}
            cols[name] = pa.array([row.tobytes() for row in arr], pa.binary())
        table = pa.table(cols).replace_schema_metadata({"rlhf_ray.arrays": json.dumps(meta)})
        return self._write("segments", table)

    def append_labels(self, labels: list[Label]) -> str | None:
        """Durably write labels; return only after they are on stable storage."""
        if not labels:
            return None
        table = pa.Table.from_pylist([lab.row() for lab in labels], schema=LABEL_SCHEMA)
        return self._write("labels", table)

    def write_queries(self, queries: list[QueryRecord]) -> str | None:
        if not queries:
            return None
        return self._write("queries", pa.Table.from_pylist([q.row() for q in queries],
                                                           schema=QUERY_SCHEMA))

    def write_texts(self, ids: list[str], prompts: list[str], responses: list[str],
                    finished: list[bool] | None = None) -> str | None:
        if not ids:
            return None
        ended = [True] * len(ids) if finished is None else [bool(f) for f in finished]
        return self._write("texts", pa.table({"text_id": ids, "prompt": prompts,
                                              "response": responses, "finished": ended},
                                             schema=TEXT_SCHEMA))

    def clip_path(self, segment_id: str, ext: str = "webm") -> str:
        if not segment_id.replace("-", "").isalnum():
            raise ValueError(f"segment id {segment_id!r}: letters, digits and '-' only")
        return f"{self.base}/clips/{segment_id}.{ext}"

    def write_clip(self, segment_id: str, data: bytes, ext: str = "webm") -> str:
        """Write a rendered clip (atomically; clips are a cache, not acknowledged data)."""
        final = self.clip_path(segment_id, ext)
        if not self.local:
            with self.fs.open_output_stream(final) as out:
                out.write(data)
            return final
        tmp = f"{self.base}/clips/.tmp-{uuid.uuid4().hex[:8]}-{segment_id}.{ext}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, final)
        return final

    def read_clip(self, segment_id: str, ext: str = "webm") -> bytes | None:
        path = self.clip_path(segment_id, ext)
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except (FileNotFoundError, OSError):
            return None

    def has_clip(self, segment_id: str, ext: str = "webm") -> bool:
        return self.fs.get_file_info(self.clip_path(segment_id, ext)).type == pafs.FileType.File

    # ------------------------------------------------------------------ reading
    def _parts(self, sub: str) -> list[str]:
        sel = pafs.FileSelector(f"{self.base}/{sub}", allow_not_found=True)
        paths = [i.path for i in self.fs.get_file_info(sel)
                 if i.type == pafs.FileType.File and os.path.basename(i.path).startswith("part-")
                 and i.path.endswith(".parquet")]
        return sorted(paths)

    def _tables(self, sub: str, read=pq.read_table) -> list[tuple[str, pa.Table]]:
        """(path, table) of every part of `sub`, in write order (`read`: what to make of each
        part instead of its whole table). A part that vanished between the listing and the
        read was merged by a compaction, whose merged part was written first: list again and
        read only what is new (on an object store deleting thousands of parts takes a while,
        so this waits as long as parts keep moving)."""
        done: dict[str, pa.Table] = {}
        for attempt in range(600):
            listed = self._parts(sub)
            try:
                for p in listed:
                    if p not in done:
                        done[p] = self._read(p, read)
                return [(p, done[p]) for p in listed]
            except _Vanished:
                time.sleep(min(1.0, 0.02 * (attempt + 1)))
        raise StoreError(f"{self.root}/{sub}: parts kept vanishing while read for minutes "
                         "(a compaction running in a loop?)")

    def _read(self, path: str, read=pq.read_table):
        try:
            with self.fs.open_input_file(path) as f:
                return read(f)
        except (pa.ArrowInvalid, OSError) as exc:
            # an object store may report a part deleted under the read as a plain error
            if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise _Vanished(f"{path}: gone while the store was read (compacted)") from None
            raise StoreError(f"{path}: unreadable Parquet part ({str(exc).splitlines()[0]}); "
                             "run `rlhf-ray store check` to quarantine it") from None

    def labels(self) -> pa.Table:
        """Every acknowledged label, one row per query id (the first written wins)."""
        return _merge([t for _, t in self._tables("labels")], LABEL_SCHEMA, "query_id")

    def queries(self) -> pa.Table:
        """Every query ever asked (answered or not), one row per query id."""
        return _merge([t for _, t in self._tables("queries")], QUERY_SCHEMA, "query_id")

    def pending_queries(self) -> list[QueryRecord]:
        """Queries asked but never answered (a ranking is answered once any of its pairs is)."""
        labels = self.labels()
        done = set(labels.column("query_id").to_pylist())
        done |= {r for r in labels.column("ranking_id").to_pylist() if r}
        return [QueryRecord(r["query_id"], r["kind"], r["item_ids"], r["created_at"].timestamp(),
                            r["rm_version"])
                for r in self.queries().to_pylist() if r["query_id"] not in done]

    def texts(self, ids: list[str]) -> dict[str, tuple[str, str, bool]]:
        """text id -> (prompt, response, finished) for the ids asked."""
        want, found = set(ids), {}
        for _, table in self._tables("texts"):
            for r in table.to_pylist():
                if r["text_id"] in want:
                    ended = r.get("finished")
                    found[r["text_id"]] = (r["prompt"], r["response"], ended is None or ended)
        missing = [i for i in ids if i not in found]
        if missing:
            raise StoreError(f"{self.root}: {len(missing)} text(s) missing, e.g. {missing[0]}")
        return found

    def count(self) -> int:
        return len(self.labels())

    def segments(self, ids: list[str] | None = None) -> SegmentBatch:
        """The stored segments with these ids (all when None), in the order asked. The parts
        are read one at a time and a few rows at a time, keeping only the wanted rows: a
        store holds gigabytes of Atari frames, and a resumed run reads its labels' segments
        a page at a time."""
        want = None if ids is None else set(ids)
        found: dict[str, tuple[int, dict[str, np.ndarray]]] = {}
        for _, rows in self._tables("segments", lambda f: _segment_rows(f, want)):
            found.update(rows)
        order = list(found) if ids is None else ids
        missing = [i for i in order if i not in found]
        if missing:
            raise StoreError(f"{self.root}: {len(missing)} segment(s) referenced by labels are "
                             f"missing, e.g. {missing[0]}")
        if not order:
            raise StoreError(f"{self.root}: no segments stored")
        names = list(found[order[0]][1])
        return SegmentBatch(ids=list(order),
                            arrays={n: np.stack([found[i][1][n] for i in order]) for n in names},
                            env_steps=np.array([found[i][0] for i in order], dtype=np.int64))

    # ------------------------------------------------------------------ compaction
    def compact(self, tables: tuple[str, ...] = ("labels", "queries", "texts", "segments"),
                min_parts: int = 2, min_age_s: float = 60.0) -> dict[str, tuple[int, int]]:
        """Merge each table's parts into one part (segments: one per array layout). Returns
        {table: (parts merged, parts they became)}. Nothing is lost at any point: the merged
        part is durable before a merged part is deleted, and rows stay in write order (the
        first label written for a query still wins). Only parts named over `min_age_s`
        ago are merged: a part's name is taken when its write starts, so a younger one may
        still be landing, and must keep sorting after the merged part. An unreadable part
        stops it with the part's name before that table changed (`rlhf-ray store check --quarantine`
        moves such parts aside)."""
        keys = {"labels": ("query_id", LABEL_SCHEMA), "queries": ("query_id", QUERY_SCHEMA),
                "texts": ("text_id", TEXT_SCHEMA), "segments": ("segment_id", None)}
        out: dict[str, tuple[int, int]] = {}
        for sub in tables:
            if sub not in keys:
                raise ValueError(f"table {sub!r}: one of {', '.join(keys)}")
            key, schema = keys[sub]
            cutoff = time.time_ns() - int(min_age_s * 1e9)
            parts = [(p, t) for p, t in self._tables(sub) if _named_at(p) < cutoff]
            if len(parts) < min_parts:
                out[sub] = (len(parts), len(parts))
                continue
            groups: dict[bytes, list[pa.Table]] = {}
            for _, table in parts:  # segments: parts of one array layout merge together
                layout = (table.schema.metadata or {}).get(b"rlhf_ray.arrays", b"") \
                    if schema is None else b""
                groups.setdefault(layout, []).append(table)
            last = os.path.basename(parts[-1][0]).removesuffix(".parquet")
            written = []
            for group in groups.values():
                merged = _merge(group, schema, key)
                # named after the newest part it holds: it sorts among the parts it replaces,
                # before anything written later
                written.append(self._write(sub, merged, f"{last}-c{uuid.uuid4().hex[:8]}.parquet"))
            for path, _ in parts:
                try:
                    self.fs.delete_file(path)
                except FileNotFoundError:  # another compaction got there first
                    pass
            if self.local:
                self._fsync_dir(sub)
            out[sub] = (len(parts), len(written))
        return out


def _named_at(path: str) -> int:
    """The time (ns) in a part's name, `part-<ns>-...`; 0 where the name has none."""
    stamp = os.path.basename(path)[5:25]
    return int(stamp) if stamp.isdigit() else 0


class _Vanished(StoreError):
    """A listed part was gone when read (merged by a compaction)."""


def _merge(tables: list[pa.Table], schema: pa.Schema | None, key: str) -> pa.Table:
    """Parts concatenated in write order, one row per `key` (the first written wins).
    `schema` None (segments): the parts share their columns and array metadata."""
    if not tables:
        return schema.empty_table()
    if schema is not None:
        tables = [_conform(t, schema) for t in tables]
    table = pa.concat_tables(tables)
    seen: set[str] = set()
    keep = [i for i, q in enumerate(table.column(key).to_pylist())
            if not (q in seen or seen.add(q))]
    return table.take(pa.array(keep, pa.int64())) if len(keep) < len(table) else table


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A part as `schema`: columns added since it was written come back as nulls."""
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names
            else pa.nulls(len(table), f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


__all__ = ["Label", "PreferenceStore", "QueryRecord", "LABEL_SCHEMA", "QUERY_SCHEMA", "MU"]
