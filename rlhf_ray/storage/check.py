"""`rlhf-ray store check RUN_DIR [--quarantine]`: read every part of a preference store
back, and move the ones that cannot be read aside so the store opens."""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rlhf_ray.storage.store import LABEL_SCHEMA, QUERY_SCHEMA, TEXT_SCHEMA, PreferenceStore


def check(store: PreferenceStore, quarantine: bool = False) -> dict:
    """Read every part back. Reports parts that are not readable Parquet or lack their
    table's columns, temp files a crash left behind (never acknowledged), and labels
    whose segments are missing. `quarantine`: move the unreadable parts and temp files to
    `quarantine/<table>/` (renamed, never deleted or overwritten), so the store opens."""
    need = {"labels": LABEL_SCHEMA, "queries": QUERY_SCHEMA, "texts": TEXT_SCHEMA,
            "segments": None}
    report: dict = {"root": store.root, "parts": 0, "rows": {}, "bad": [], "temp": [],
                    "quarantined": [], "missing_segments": 0}
    segment_ids: set[str] = set()
    label_refs: list[str] = []
    for sub, schema in need.items():
        report["rows"][sub] = 0
        sel = pafs.FileSelector(f"{store.base}/{sub}", allow_not_found=True)
        for info in store.fs.get_file_info(sel):
            name = os.path.basename(info.path)
            if info.type != pafs.FileType.File:
                continue
            if name.startswith(".tmp-"):
                report["temp"].append(info.path)
                continue
            if not (name.startswith("part-") and name.endswith(".parquet")):
                continue
            report["parts"] += 1
            try:
                with store.fs.open_input_file(info.path) as f:
                    table = pq.read_table(f)
            except (pa.ArrowInvalid, OSError) as exc:
                report["bad"].append((info.path, str(exc).splitlines()[0]))
                continue
            cols = set(table.column_names)
            lacking = [] if schema is None else [
                f.name for f in schema if f.name not in cols and f.name != "ranking_id"]
            if schema is None and "segment_id" not in cols:
                lacking = ["segment_id"]
            if lacking:
                report["bad"].append((info.path, f"lacks column(s) {', '.join(lacking)}"))
                continue
            report["rows"][sub] += len(table)
            if sub == "segments":
                segment_ids.update(table.column("segment_id").to_pylist())
            elif sub == "labels":
                label_refs += [i for i in table.column("left_id").to_pylist()
                               + table.column("right_id").to_pylist()]
    text_ids: set[str] = set()
    if report["rows"]["texts"]:
        for p in store._parts("texts"):
            if p not in {b for b, _ in report["bad"]}:
                text_ids.update(store._read(p).column("text_id").to_pylist())
    report["missing_segments"] = len({i for i in label_refs
                                      if i not in segment_ids and i not in text_ids})
    if quarantine:
        for path in [b for b, _ in report["bad"]] + report["temp"]:
            sub = os.path.basename(os.path.dirname(path))
            dest_dir = f"{store.base}/quarantine/{sub}"
            store.fs.create_dir(dest_dir, recursive=True)
            dest = f"{dest_dir}/{os.path.basename(path)}"
            if store.fs.get_file_info(dest).type != pafs.FileType.NotFound:
                dest = f"{dest}.{uuid.uuid4().hex[:8]}"  # never overwrite
            store.fs.move(path, dest)
            report["quarantined"].append(dest)
    return report
