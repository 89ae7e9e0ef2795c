"""An index of each local source, built once, so that finding a clip never lists a folder.

A source's index is one Parquet file, ``01-download/sources/<name>.parquet``: a row per file (a
folder's), member (a tar shard's) or row (a dataset's) whose name the pattern matches, with its
key (:func:`stages.download.sources.key_of`), size and mtime (or the member's data offset), and
why it is refused if it is (a symbolic link out of the root, a member name that is absolute or
climbs out with ``..``, a link member). Building it reads directory entries and tar headers only:
no file is opened for its content. It is rebuilt when the source changes: a folder's directories
(their mtimes change when an entry is added, removed or renamed), a tar source's shards (names,
sizes, mtimes) or a dataset's fingerprint, or the source's settings. Two processes that start at
once build it once (a ``filelock`` beside it), and a reader never sees a partial index (atomic
rename).

Looking a clip up is a dict lookup (:meth:`SourceIndex.rows`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun
from pipeline.io import atomic_path
from stages.download.sources import FolderSource, HfSource, Pattern, TarSource, key_of, source_pattern

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("avcaps")
INDEX_VERSION = 1
EXAMPLES = 5  # names kept as examples of what the pattern does not match


def _schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("entry", pa.string()),  # file (an indexed name), dir (a folder's), shard (a tar's)
            pa.field("key", pa.string()),
            pa.field("name", pa.string()),  # path below the root, member name, or row label
            pa.field("size", pa.int64()),
            pa.field("mtime_ns", pa.int64()),
            pa.field("shard", pa.int32()),  # tar: which shard (its `shard` row's number)
            pa.field("offset", pa.int64()),  # tar: the member's data offset; hf: the row
            pa.field("refused", pa.string()),  # why this entry may not be taken (null: it may)
        ]
    )


COLUMNS = ("entry", "key", "name", "size", "mtime_ns", "shard", "offset", "refused")
CHUNK = 65_536  # rows held as Python objects before they become an Arrow batch


@dataclass
class Built:
    """What indexing found: rows (Arrow batches, so 2M names never sit in memory as Python
    objects), and the figures."""

    rows: dict[str, list[Any]] = field(default_factory=lambda: {c: [] for c in COLUMNS})
    batches: list[pa.RecordBatch] = field(default_factory=list)
    names: int = 0  # files, members or rows seen
    unmatched: int = 0
    examples: list[str] = field(default_factory=list)
    signature: dict[str, Any] = field(default_factory=dict)  # what the index is current for, besides rows

    def add(self, entry: str, key: str | None, name: str, size: int = 0, mtime_ns: int = 0,
            shard: int = -1, offset: int = -1, refused: str | None = None) -> None:  # fmt: skip
        values = (entry, key, name, size, mtime_ns, shard, offset, refused)
        for col, value in zip(COLUMNS, values, strict=True):
            self.rows[col].append(value)
        if len(self.rows["entry"]) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.rows["entry"]:
            self.batches.append(pa.RecordBatch.from_pydict(self.rows, schema=_schema()))
            self.rows = {c: [] for c in COLUMNS}

    def table(self) -> pa.Table:
        import pyarrow as pa

        self._flush()
        return pa.Table.from_batches(self.batches, schema=_schema())

    def miss(self, name: str) -> None:
        self.unmatched += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(name)


# -- building -------------------------------------------------------------------------------------
def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def build_folder(src: FolderSource, pattern: Pattern) -> Built:
    """Walk the tree with ``os.scandir`` (one listing per directory, entry types from the listing,
    one ``stat`` per matching name); symbolic links are resolved and must stay inside the root;
    linked directories are not followed. Hidden names (``.*``) are skipped."""
    root = Path(src.path)
    real_root = os.path.realpath(root)
    out = Built()
    stack = [""]
    while stack:
        rel = stack.pop()
        folder = os.path.join(root, rel) if rel else str(root)
        out.add("dir", None, rel, mtime_ns=os.stat(folder).st_mtime_ns)
        with os.scandir(folder) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                name = f"{rel}/{e.name}" if rel else e.name
                if e.is_dir(follow_symlinks=False):
                    stack.append(name)
                    continue
                out.names += 1
                key = pattern.key(name)
                if key is None:
                    out.miss(name)
                    continue
                refused = None
                if e.is_symlink():
                    target = os.path.realpath(e.path)
                    if not inside(target, real_root):
                        refused = f"a symbolic link to {target}, outside the source's root {real_root}"
                    elif not os.path.isfile(target):
                        refused = f"a symbolic link to {target}, which is not a file"
                if refused is not None:
                    out.add("file", key, name, refused=refused)
                    continue
                st = e.stat()  # follows a link that stays inside: the target's size and mtime
                out.add("file", key, name, st.st_size, st.st_mtime_ns)
    return out


def shard_paths(spec: str) -> list[str]:
    """A tar source's shards: a brace list (WebDataset's ``shard-{000..127}.tar``, expanded with
    ``braceexpand``, the parser WebDataset itself uses) and/or a glob, sorted, without repeats."""
    from braceexpand import braceexpand

    found: set[str] = set()
    for part in braceexpand(spec):
        found.update(glob.glob(part) if glob.has_magic(part) else [part] if os.path.isfile(part) else [])
    return sorted(found)


def member_refusal(name: str, info: tarfile.TarInfo) -> str | None:
    """Why a member may not be taken: a name that would land outside the extraction folder, or a
    member that is not a regular file (links, devices)."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "an absolute member name"
    if ".." in name.replace("\\", "/").split("/"):
        return "a member name that climbs out of the shard ('..')"
    if not info.isreg():
        return "not a regular file (a link or a special member)"
    return None


def build_tar(src: TarSource, pattern: Pattern) -> Built:
    """Read every shard's headers (``tarfile`` seeks past the data, so nothing is extracted) and
    record each matching member's data offset and size."""
    shards = shard_paths(src.path)
    out = Built()
    for n, path in enumerate(shards):
        st = os.stat(path)
        out.add("shard", None, path, st.st_size, st.st_mtime_ns, shard=n)
        try:
            with tarfile.open(path, "r:") as tf:  # "r:": uncompressed only, so offsets are file offsets
                for info in tf:
                    if info.isdir():
                        continue
                    out.names += 1
                    key = pattern.key(info.name)
                    if key is None:
                        out.miss(info.name)
                        continue
                    refused = member_refusal(info.name, info)
                    out.add(
                        "file", key, info.name, info.size, int(info.mtime * 1e9), n, info.offset_data, refused
                    )
        except tarfile.TarError as exc:
            raise AbortRun(
                f"download source tar:{src.name or src.default_name()}: {path} is not an uncompressed tar "
                f"shard ({exc}); members are read by offset, so decompress it (e.g. `gunzip`)"
            ) from exc
    return out


def load_hf(src: HfSource) -> Any:
    """The dataset of an ``hf`` source: a folder written by ``save_to_disk`` (memory-mapped), any
    other local folder ``datasets.load_dataset`` reads (Parquet files, a Hub clone), or a Hub id."""
    import datasets

    what = f"download source hf:{src.name or src.default_name()}"
    path = Path(src.dataset).expanduser()
    looks_local = src.dataset.startswith((".", "/", "~")) or path.exists()
    try:
        if looks_local and not path.exists():
            raise AbortRun(f"{what}: dataset folder {src.dataset} does not exist")
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(
                str(path) if looks_local else src.dataset, name=src.config_name, revision=src.revision
            )
    except AbortRun:
        raise
    except Exception as exc:
        raise AbortRun(f"{what}: cannot load dataset {src.dataset!r}: {type(exc).__name__}: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if src.split is None and len(ds) != 1:
            raise AbortRun(f"{what}: the dataset has splits {sorted(ds)}: set `split`")
        split = src.split or next(iter(ds))
        if split not in ds:
            raise AbortRun(f"{what}: the dataset has no split {split!r} (it has {sorted(ds)})")
        ds = ds[split]
    if getattr(ds, "_indices", None) is not None:  # a selection or shuffle: rows read by position
        ds = ds.flatten_indices()
    missing = [c for c in [src.media_column, *src.columns.values()] if c not in ds.column_names]
    if missing:
        raise AbortRun(f"{what}: the dataset has no column(s) {missing} (it has {ds.column_names})")
    return ds


def build_hf(src: HfSource, pattern: Pattern, ds: Any) -> Built:
    """A row per dataset row whose identifying cells name a clip (read column-wise from Arrow)."""
    out = Built(signature={"fingerprint": getattr(ds, "_fingerprint", None)})
    table = ds.data.table.select(list(dict.fromkeys(src.columns.values())))
    values = {ph: table.column(col).to_pylist() for ph, col in src.columns.items()}
    for row in range(table.num_rows):
        out.names += 1
        cells = {ph: v[row] for ph, v in values.items()}
        key = key_of(pattern.holds, cells)
        label = f"row {row}"
        if key is None:
            out.miss(f"{label}: {cells}")
            continue
        out.add("file", key, label, offset=row)
    return out


# -- the index --------------------------------------------------------------------------------------
class SourceIndex:
    """A local source's index, loaded for lookups: ``rows(keys)`` gives the entries holding a clip.

    ``wanted``: the keys the run's clips can have; only those entries are kept for lookups, so a
    lab's 2M-file AudioSet copy feeding a 51k-clip run holds 51k entries in memory, not 2M.
    """

    def __init__(
        self,
        src: Any,
        pattern: Pattern,
        table: pa.Table,
        meta: dict[str, Any],
        path: Path | None,
        wanted: pa.Array | None = None,
    ) -> None:
        import pyarrow.compute as pc

        self.src, self.pattern, self.meta, self.path = src, pattern, meta, path
        files = table.filter(_is(table, "file"))
        if wanted is not None:
            files = files.filter(pc.is_in(files["key"], value_set=wanted))
        self.files = files
        self.table = table.filter(pc.invert(_is(table, "file")))  # dirs and shards
        keys = files["key"].to_pylist()
        # One hash lookup per clip: the last row of each key here, all of a key's rows in `dups`.
        self._first: dict[str, int] = dict(zip(keys, range(len(keys)), strict=True))
        self._dups: dict[str, list[int]] = {}
        if len(self._first) != len(keys):
            for i, k in enumerate(keys):
                self._dups.setdefault(k, []).append(i)
            self._dups = {k: v for k, v in self._dups.items() if len(v) > 1}
        self.ds: Any = None  # an hf source's dataset, for reading cells
        self.rebuilt: str | None = None  # why it was built by this process (None: read, current)

    @property
    def label(self) -> str:
        return str(self.src.label)

    def rows(self, keys: list[str]) -> list[dict[str, Any]]:
        """The entries (as dicts) under any of ``keys``: none, one, or several (ambiguous)."""
        found: list[int] = []
        for k in keys:
            if k in self._dups:
                found += self._dups[k]
            elif (i := self._first.get(k)) is not None:
                found.append(i)
        return [self.files.slice(i, 1).to_pylist()[0] for i in dict.fromkeys(found)]

    def shard(self, n: int) -> str:
        shards = self.table.filter(_is(self.table, "shard"))
        return str(shards["name"][shards["shard"].to_pylist().index(n)])

    @property
    def keys(self) -> pa.Array:
        return self.files["key"].combine_chunks()

    def figures(self) -> dict[str, Any]:
        return {
            k: self.meta.get(k) for k in ("names", "matched", "unmatched", "examples", "refused", "built_at")
        }


def _is(table: pa.Table, entry: str) -> pa.Array:
    import pyarrow.compute as pc

    return pc.equal(table["entry"], entry)


def _settings(src: Any) -> dict[str, Any]:
    """The source's settings an index depends on (not its name, streams or placement)."""
    keep = {
        "kind",
        "path",
        "pattern",
        "dataset",
        "split",
        "config_name",
        "revision",
        "media_column",
        "columns",
    }
    return {k: v for k, v in src.model_dump(mode="json").items() if k in keep}


def _current(src: Any, table: pa.Table, meta: dict[str, Any], signature: dict[str, Any]) -> str | None:
    """Why an index on disk is out of date (None: it is current). Costs a ``stat`` per directory
    (folder) or per shard (tar), never a listing."""
    if meta.get("version") != INDEX_VERSION:
        return "index version changed"
    if meta.get("settings") != _settings(src):
        return "source settings changed"
    if meta.get("signature") != signature:
        return "the dataset changed"
    if src.kind == "folder":
        dirs = table.filter(_is(table, "dir"))
        root = Path(src.path)
        for rel, mtime in zip(dirs["name"].to_pylist(), dirs["mtime_ns"].to_pylist(), strict=True):
            try:
                if os.stat(root / rel if rel else root).st_mtime_ns != mtime:
                    return f"folder {root / rel if rel else root} changed"
            except FileNotFoundError:
                return f"folder {root / rel} is gone"
    elif src.kind == "tar":
        shards = table.filter(_is(table, "shard"))
        had = list(
            zip(
                shards["name"].to_pylist(),
                shards["size"].to_pylist(),
                shards["mtime_ns"].to_pylist(),
                strict=True,
            )
        )
        now = [(p, (st := os.stat(p)).st_size, st.st_mtime_ns) for p in shard_paths(src.path)]
        if had != now:
            return "shards changed"
    return None


def check_exists(src: Any, what: str) -> None:
    """A source's path must exist: AbortRun with one line naming it."""
    if isinstance(src, FolderSource) and not Path(src.path).is_dir():
        raise AbortRun(f"{what}: folder {src.path} does not exist (or is not a folder)")
    if isinstance(src, TarSource) and not shard_paths(src.path):
        raise AbortRun(f"{what}: no tar shard matches {src.path}")


def build(src: Any, pattern: Pattern, ds: Any = None) -> tuple[pa.Table, dict[str, Any]]:
    import pyarrow.compute as pc

    t0 = time.monotonic()
    if src.kind == "folder":
        built = build_folder(src, pattern)
    elif src.kind == "tar":
        built = build_tar(src, pattern)
    else:
        built = build_hf(src, pattern, ds)
    table = built.table()
    files = table.filter(_is(table, "file"))
    bad = files.filter(pc.is_valid(files["refused"]))
    refused = [f"{n}: {r}" for n, r in zip(bad["name"].to_pylist(), bad["refused"].to_pylist(), strict=True)]
    meta = {
        "version": INDEX_VERSION,
        "settings": _settings(src),
        "signature": built.signature,
        "names": built.names,
        "matched": files.num_rows,
        "unmatched": built.unmatched,
        "examples": built.examples,
        "refused": refused[:EXAMPLES],
        "refused_count": len(refused),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - t0, 3),
    }
    return table, meta


def _read(path: Path) -> tuple[pa.Table, dict[str, Any]] | None:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, schema=_schema())
        raw = pq.read_schema(path).metadata or {}
        return table, json.loads(raw.get(b"avcaps", b"{}"))
    except (FileNotFoundError, OSError, ValueError):
        return None  # absent or unreadable: built anew


def open_index(
    folder: Path, src: Any, what: str, save: bool = True, wanted: pa.Array | None = None
) -> SourceIndex:
    """The index of ``src``: the one on disk when it is current, else built (and saved under
    ``folder`` unless ``save`` is false: ``avcaps sources`` writes nothing); ``wanted``: the keys
    to keep for lookups (:func:`wanted_keys`; None: all)."""
    import pyarrow.parquet as pq
    from filelock import FileLock

    pattern = source_pattern(src, what)
    check_exists(src, what)
    ds = load_hf(src) if isinstance(src, HfSource) else None
    signature = {"fingerprint": getattr(ds, "_fingerprint", None)} if ds is not None else {}
    name = src.name or src.default_name()
    path = folder / f"{name}.parquet"

    def load() -> tuple[pa.Table, dict[str, Any], str | None]:
        found = _read(path)
        if found is None:
            return build_logged(None)
        table, meta = found
        why = _current(src, table, meta, signature)
        return (table, meta, None) if why is None else build_logged(why)

    def build_logged(why: str | None) -> tuple[pa.Table, dict[str, Any], str | None]:
        table, meta = build(src, pattern, ds)
        log.info(
            "%s: indexed %d name(s) in %.1f s, %d match the pattern (%s)",
            what, meta["names"], meta["seconds"], meta["matched"], why or "no index yet",
        )  # fmt: skip
        return table, meta, why or "no index yet"

    if save:
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / f".{name}.lock")):  # shards starting together index once
            table, meta, rebuilt = load()
            if rebuilt is not None:
                with atomic_path(path) as tmp:
                    schema = _schema().with_metadata({"avcaps": json.dumps(meta)})
                    pq.write_table(table.cast(schema), tmp)
    else:
        table, meta, rebuilt = load()
    index = SourceIndex(src, pattern, table, meta, path if save else None, wanted)
    del table
    index.ds = ds
    index.rebuilt = rebuilt
    if meta.get("refused_count"):
        log.warning(
            "%s: %d name(s) refused, e.g. %s", what, meta["refused_count"], "; ".join(meta["refused"][:2])
        )
    return index


def wanted_keys(holds: str, clips: pa.Table) -> pa.Array:
    """Every key a clip of ``clips`` (``clip_id``, ``youtube_id``, ``audiocap_ids``) can be held
    under by a source whose pattern identifies ``holds`` (:func:`stages.download.sources.clip_keys`,
    vectorized)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if holds == "video":
        return pc.binary_join_element_wise(pa.scalar("yt:"), clips["youtube_id"], "")
    if holds == "audiocap":
        ids = pc.list_flatten(clips["audiocap_ids"]).cast(pa.string())
        return pc.binary_join_element_wise(pa.scalar("ac:"), ids, "")
    return clips["clip_id"]


def iter_local(sources: list[Any]) -> Iterator[tuple[int, Any]]:
    for i, src in enumerate(sources):
        if src.kind != "youtube":
            yield i, src
