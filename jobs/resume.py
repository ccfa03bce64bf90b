"""Exactly once per row: stable row ids, what is already written, atomic per-file writes.

Output folder layout (any pyarrow filesystem):
    part-<hash of the file's row ids>.parquet    finished files; a file appears whole or not at all
    .tmp-<uuid>-part-....parquet                 being written (or left by a killed write); ignored, removed on
                                                 start and when the job's writes complete
    _summary.json                                the last run's summary
    _job.json                                    what the rows were made from (input files, model, columns,
                                                 sampling): a resume with other values is refused
A part file's name is a hash of the ids it holds, so a write that Ray retries (its task died after the
rename) rewrites the same name with the same rows instead of adding a duplicate file. Parquet readers
(pyarrow, pandas, Ray Data) skip names starting with "." and "_", so the folder reads as a dataset.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import uuid
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from jobs.summary import block_stats, combine_stats

# Ray Data's read_parquet(include_row_hash=True) column: a uint64 hash of the file path and row position.
DERIVED_ID_COLUMN = "row_hash"
PART_PREFIX = "part-"
TEMP_PREFIX = ".tmp-"
SUMMARY_NAME = "_summary.json"
JOB_NAME = "_job.json"


def filesystem_and_path(uri: str, filesystem: Optional[pafs.FileSystem] = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path on it; plain paths are local and made absolute."""
    if filesystem is not None:
        return filesystem, uri
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def glob_matches(pattern: str, path: str) -> bool:
    """Shell-style, one path component per pattern component: '*' never crosses '/', and names starting with '.'
    or '_' (temporary and metadata files, such as this job's own) match only a pattern that spells them out."""
    names, parts = pattern.rstrip("/").split("/"), path.rstrip("/").split("/")
    return len(names) == len(parts) and all(
        fnmatch.fnmatchcase(part, name) and (not part.startswith((".", "_")) or name.startswith(part[0]))
        for name, part in zip(names, parts))


def input_files(fs: pafs.FileSystem, path: str, flag: str = "--input") -> list[str]:
    """Parquet files of a file, a folder (recursive; hidden and _-prefixed names skipped) or a glob."""
    if is_glob(path):
        base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0] or "/"
        found = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = sorted(i.path for i in found if i.type == pafs.FileType.File and glob_matches(path, i.path))
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ValueError(f"{flag} {path}: no such file or folder")
        if info.type == pafs.FileType.File:
            return [path]
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = sorted(i.path for i in found if i.type == pafs.FileType.File and _is_data_file(i.path, path))
    if not files:
        raise ValueError(f"{flag} {path}: no Parquet files there")
    return files


def _is_data_file(path: str, root: str) -> bool:
    relative = path[len(root) :].strip("/")
    return path.endswith(".parquet") and not any(part.startswith((".", "_")) for part in relative.split("/"))


def read_footers(fs: pafs.FileSystem, files: list[str], where: str) -> tuple[pa.Schema, int]:
    """Every input file's schema, unified, and the total row count, from the Parquet footers alone. A column whose
    type differs between files (beyond widening, e.g. int32 and int64) is an error naming both files."""
    schema, rows, origin = pa.schema([]), 0, {}
    for path in files:
        meta = _footer(fs, path, where)
        rows += meta.num_rows
        file_schema = meta.schema.to_arrow_schema()
        try:
            unified = pa.unify_schemas([schema, file_schema], promote_options="permissive")
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            name = next(f.name for f in file_schema if f.name in origin and not _widens(schema, file_schema, f.name))
            raise ValueError(f"{where}: column {name!r} is {schema.field(name).type} in {origin[name]} but "
                             f"{file_schema.field(name).type} in {path}") from None
        # origin: the file the column's type so far comes from (a later file may widen it, or type an all-null one)
        origin.update({f.name: path for f in file_schema
                       if f.name not in origin or unified.field(f.name).type != schema.field(f.name).type})
        schema = unified
    return schema, rows


def _footer(fs: pafs.FileSystem, path: str, where: str) -> pq.FileMetaData:
    """A file's Parquet footer. Arrow's error for a file that is no Parquet (a copy cut short, another format) does
    not say which file it read: in a folder of many, that is what the user needs."""
    try:
        return pq.read_metadata(path, filesystem=fs)
    except pa.ArrowInvalid as e:
        raise ValueError(f"{where}: {path} is not a readable Parquet file ({e})") from None


def _widens(a: pa.Schema, b: pa.Schema, name: str) -> bool:
    try:
        pa.unify_schemas([pa.schema([a.field(name)]), pa.schema([b.field(name)])], promote_options="permissive")
        return True
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return False


def check_output_parts(fs: pafs.FileSystem, root: str, columns: list[str], where: str) -> None:
    """part-*.parquet files already in the output folder must be this job's (they hold its id and output columns):
    any other file named so would be read as rows already written."""
    for path in part_files(fs, root):
        missing = [c for c in columns if c not in pq.read_schema(path, filesystem=fs).names]
        if missing:
            raise ValueError(f"{where}: {path} was not written by this job (it has no {missing} column); give an "
                             f"empty folder, or this job's own to resume it")


def input_fingerprint(fs: pafs.FileSystem, files: list[str]) -> list[list]:
    """[path, rows, hash of the Parquet footer] per input file: a file rewritten with other rows (or the same rows
    in another order, which moves the derived row ids) gets another footer (row group sizes and statistics)."""
    out = []
    for path in files:
        meta = pq.read_metadata(path, filesystem=fs)
        footer = hashlib.sha1(repr(meta.to_dict()).encode()).hexdigest()[:20]
        out.append([path, meta.num_rows, footer])
    return out


def check_job_record(fs: pafs.FileSystem, root: str, record: dict, where: str) -> None:
    """The output folder's _job.json, if any, must match this run's: rows written from other input files, another
    model or other sampling parameters would otherwise be skipped as done and silently mixed with this run's."""
    path = f"{root}/{JOB_NAME}"
    if fs.get_file_info(path).type != pafs.FileType.File or not part_files(fs, root):
        return  # nothing written yet: nothing to mix with
    with fs.open_input_stream(path) as f:
        old = json.loads(f.read().decode())
    new = json.loads(json.dumps(record))
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if not changed:
        return
    details = []
    for key in changed:
        if key == "input":
            before, after = ({f[0]: f for f in r.get(key) or []} for r in (old, new))
            files = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p)) or ["(order)"]
            details.append(f"{len(files)} input file(s) added, removed or rewritten, e.g. {files[0]}")
        else:
            details.append(f"{key} was {old.get(key)!r}, now {new.get(key)!r}")
    raise ValueError(f"{where} holds rows of another job: {'; '.join(details)}. Resume with the same input and "
                     f"arguments, or give a new output folder (deleting {path} lets the rows mix)")


def write_job_record(fs: pafs.FileSystem, root: str, record: dict) -> None:
    """Writes _job.json (temp name, then renamed) unless the folder has rows already (check_job_record passed)."""
    path = f"{root}/{JOB_NAME}"
    if part_files(fs, root) and fs.get_file_info(path).type == pafs.FileType.File:
        return
    write_whole(fs, root, JOB_NAME, json.dumps(record, indent=2))


def write_whole(fs: pafs.FileSystem, root: str, name: str, text: str) -> None:
    """Writes root/name under a temp name, then renames it: a kill mid-write leaves the old file (or none), never
    a torn one (the temp is removed on the next start)."""
    temp = f"{root}/{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}"
    with fs.open_output_stream(temp) as f:
        f.write(text.encode())
    fs.move(temp, f"{root}/{name}")


def part_files(fs: pafs.FileSystem, root: str) -> list[str]:
    found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(i.path for i in found if i.base_name.startswith(PART_PREFIX) and i.base_name.endswith(".parquet"))


def remove_temp_files(fs: pafs.FileSystem, root: str) -> int:
    """Delete files a killed run left half-written. One job per output folder at a time."""
    found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    temps = [i.path for i in found if i.base_name.startswith(TEMP_PREFIX)]
    for path in temps:
        fs.delete_file(path)
    return len(temps)


def written_ids(fs: pafs.FileSystem, root: str, id_column: str) -> Optional[pa.Array]:
    """The ids of every row already in the output folder, or None when there is none."""
    parts = part_files(fs, root)
    if not parts:
        return None
    return pa.concat_arrays(_part_ids(fs, parts, id_column))


def _part_ids(fs: pafs.FileSystem, parts: list[str], id_column: str) -> list[pa.Array]:
    """Each part file's ids, of one type: a file's own may differ (int32 and int64 input files: int64), and read as
    the first file's type a large id does not fit."""
    ids = [_decoded(pq.read_table(p, columns=[id_column], filesystem=fs).column(id_column)) for p in parts]
    common = pa.unify_schemas([pa.schema([pa.field(id_column, a.type)]) for a in ids],
                              promote_options="permissive").field(id_column).type
    return [a.cast(common) for a in ids]


def check_ids(ids: pa.ChunkedArray, column: str, where: str) -> None:
    """A given id column must hold one non-null, distinct id per row: resume and the exactly-once output
    match rows by id, so a null or repeated id would lose or merge rows."""
    if pa.types.is_nested(ids.type) or pa.types.is_floating(ids.type):
        raise ValueError(f"--id-column {column!r} in {where} holds {ids.type}; ids must be integers or strings")
    if ids.null_count:
        first = pc.indices_nonzero(ids.is_null())[0].as_py()
        raise ValueError(f"--id-column {column!r} in {where}: {ids.null_count} row(s) have a null id "
                         f"(the first is row {first}, counting over the input files in name order); every row needs an id")
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        example = repeated[0]
        raise ValueError(f"--id-column {column!r} in {where}: {len(repeated)} id(s) appear more than once, e.g. "
                         f"{example['values'].as_py()!r} ({example['counts'].as_py()} rows); ids must be unique")


def drop_written(batch: pa.Table, id_column: str, written: pa.Array) -> pa.Table:
    """Rows of `batch` whose id is not yet written (a Ray Data map_batches function)."""
    return batch.filter(pc.invert(pc.is_in(batch.column(id_column), value_set=written)))


def remove_duplicates(fs: pafs.FileSystem, root: str, id_column: str) -> int:
    """Rows whose id another part file holds too keep only their copy in the first such file (in name order); the
    others go. Returns how many rows went.

    A run never writes an id it saw written, but a killed run's last writes may still land just after a quick
    restart listed the folder: both runs then hold those rows. Checked once a run's writes are done. The plan comes
    first: files left with nothing are deleted, then each file left with some rows is rewritten under the name of
    those ids (temp, then rename) and the old one deleted. A crash part way leaves every row at least once, and
    the next run finishes the job. A rewrite's name can only be that of a file left with nothing (same ids), which
    is gone by then."""
    parts = part_files(fs, root)
    if len(parts) < 2:
        return 0
    ids = _part_ids(fs, parts, id_column)
    owners = pa.table({"id": pa.concat_arrays(ids),
                       "file": np.repeat(np.arange(len(parts), dtype=np.int32), [len(a) for a in ids])})
    counts = owners.group_by("id").aggregate([("file", "min"), ("file", "count")])
    repeated = counts.filter(pc.greater(counts["file_count"], 1))
    if not len(repeated):
        return 0
    drops = {}
    for f, path in enumerate(parts):
        taken = pc.is_in(ids[f], value_set=repeated.filter(pc.not_equal(repeated["file_min"], f))["id"])
        if pc.any(taken).as_py():
            drops[path] = taken
    emptied = [path for path, taken in drops.items() if pc.all(taken).as_py()]
    for path in emptied:
        fs.delete_file(path)
    for path, taken in drops.items():
        if path not in emptied:
            kept = pq.read_table(path, filesystem=fs).filter(pc.invert(taken))
            name = part_name(kept.column(id_column))
            temp = f"{root}/{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}"
            pq.write_table(kept, temp, filesystem=fs)
            fs.move(temp, f"{root}/{name}")
            fs.delete_file(path)
    return sum(pc.sum(taken).as_py() for taken in drops.values())


def _decoded(ids: pa.ChunkedArray) -> pa.Array:
    ids = ids.combine_chunks()
    # a dictionary-encoded id column (pandas categorical) comes back so, and is_in takes no dictionary value set
    return ids.dictionary_decode() if pa.types.is_dictionary(ids.type) else ids


def part_name(ids: pa.ChunkedArray) -> str:
    """A name of the ids alone, however they are chunked."""
    digest = hashlib.sha1(repr(ids.combine_chunks().to_pylist()).encode())
    return f"{PART_PREFIX}{digest.hexdigest()[:20]}.parquet"


class AtomicParquetDatasink(Datasink):
    """Writes each write task's rows to one Parquet file: to a temp name first, then renamed into place.

    After the write completes, `stats` holds the summed row and token counts (see summary.block_stats)."""

    def __init__(self, fs: pafs.FileSystem, root: str, id_column: str):
        self.fs, self.root, self.id_column = fs, root, id_column
        self.stats: dict = combine_stats([])

    def write(self, blocks: Iterable, ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return combine_stats([])
        table = pa.concat_tables(tables, promote_options="permissive")
        name = part_name(table.column(self.id_column))
        temp = f"{self.root}/{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}"
        pq.write_table(table, temp, filesystem=self.fs)
        self.fs.move(temp, f"{self.root}/{name}")  # rename: readers see the whole file or nothing
        return block_stats(table)

    def on_write_complete(self, write_result) -> None:
        self.stats = combine_stats(write_result.write_returns)
        # every write has finished; a temp file now is one a lost worker left mid-write (its rows were written again)
        remove_temp_files(self.fs, self.root)
