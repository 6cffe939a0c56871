"""Where records come from: a JSONL file, Parquet, Arrow, a `save_to_disk` folder or a Hub dataset.

    --data train.jsonl                     JSONL (core; no extra needed)
    --data train.parquet | data/           a Parquet or Arrow file, or a folder of them (splits from file names)
    --data saved/                          a folder written by datasets' save_to_disk (Dataset or DatasetDict)
    --data hf:org/name [--data-config C]   a Hub dataset; offline, from the local Hugging Face cache
    [--data-split S] [--prompt-field F --response-field F --messages-field F]

Everything but JSONL needs the `datasets` library (`pip install 'deltakd[datasets]'`).
Rows stream: Parquet files are read a row group at a time and Arrow files a record batch
at a time (pyarrow), save_to_disk folders and Hub datasets are memory-mapped Arrow
(datasets); memory holds a batch of rows, never the whole set.

Identity (`RecordStream.identity`, after a full pass): for JSONL with the default fields,
`{"path", "sha256"}` of the file's bytes, exactly as caches have always recorded it; for
every other source (and for JSONL read with other field names) the sha256 of the records
as parsed, so a changed dataset behind the same name is a different cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from deltakd.cache.format.records import DataError, Fields, Record, iter_jsonl, parse_record

HUB_PREFIX = "hf:"
DISK_MARKERS = ("dataset_dict.json", "state.json")  # what datasets' save_to_disk writes
FILE_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}
INSTALL = "pip install 'deltakd[datasets]'"
ROWS_PER_BATCH = 256  # rows decoded from Arrow at once: the reading's memory, whatever the size of the data


@dataclass(frozen=True)
class DataSource:
    data: str
    split: str | None = None  # None: the only split, else `default_split`
    config: str | None = None  # a Hub dataset's configuration (subset)
    fields: Fields = field(default_factory=Fields)
    default_split: str = "train"  # `deltakd eval` reads "test"

    @property
    def kind(self) -> str:
        """jsonl, parquet, arrow (files), folder (data files), disk (save_to_disk) or hub."""
        if self.data.startswith(HUB_PREFIX):
            return "hub"
        p = Path(self.data).expanduser()
        if p.is_dir():
            return "disk" if any((p / m).is_file() for m in DISK_MARKERS) else "folder"
        return FILE_FORMATS.get(p.suffix.lower(), "jsonl")


def open_records(source: DataSource, require_response: bool = True) -> RecordStream:
    return RecordStream(source, require_response)


class RecordStream:
    """The records of a source, streamed; each full pass also computes the source's identity."""

    def __init__(self, source: DataSource, require_response: bool = True):
        self.source, self.require_response = source, require_response
        self.identity: dict | None = None  # set at the end of a full pass
        self.n_records = 0

    def __iter__(self) -> Iterator[Record]:
        src, h = self.source, hashlib.sha256()
        if src.kind == "jsonl":
            path = Path(src.data).expanduser()
            file_hash = hashlib.sha256()
            for rec in iter_jsonl(path, src.fields, self.require_response, hasher=file_hash):
                h.update(record_bytes(rec))
                self.n_records = rec.example_id + 1
                yield rec
            if src.fields.is_default:  # the identity caches of JSONL files have always recorded
                self.identity = {"path": str(path.resolve()), "sha256": file_hash.hexdigest()}
            else:
                self.identity = self._records_identity(str(path.resolve()), "jsonl", None, h.hexdigest())
            return
        split, rows = iter_rows(src)
        self.n_records = 0
        for n, row in enumerate(rows):
            # A column missing from a row (null) is absent: rows of one table may use different shapes.
            obj = {k: v for k, v in row.items() if v is not None}
            rec = parse_record(obj, n, f"{src.data} row {n}", self.require_response, src.fields)
            h.update(record_bytes(rec))
            self.n_records = n + 1
            yield rec
        if self.n_records == 0:
            raise DataError(f"{src.data}{f' (split {split})' if split else ''}: no records (the dataset is empty)")
        where = src.data if src.kind == "hub" else str(Path(src.data).expanduser().resolve())
        self.identity = self._records_identity(where, src.kind, split, h.hexdigest())

    def _records_identity(self, where: str, kind: str, split, digest: str) -> dict:
        ident = {"path": where, "format": kind, "sha256": digest, "hash_of": "records"}
        if split:
            ident["split"] = split
        if self.source.config:
            ident["config"] = self.source.config
        if not self.source.fields.is_default:
            ident["fields"] = vars(self.source.fields).copy()
        return ident


def record_bytes(rec: Record) -> bytes:
    """What the content hash of a non-JSONL source covers: each record as the cache sees it, in order."""
    return (json.dumps([[list(t) for t in rec.messages], rec.response], ensure_ascii=False) + "\n").encode()


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"reading Parquet, Arrow, save_to_disk and Hub datasets needs the datasets library: {INSTALL}"
        ) from e
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def _choose_split(src: DataSource, splits: list[str]) -> str:
    if src.split is not None:
        if src.split not in splits:
            raise DataError(
                f"{src.data}: no split {src.split!r} (splits: {', '.join(splits)}); choose one with --data-split"
            )
        return src.split
    if len(splits) == 1:
        return splits[0]
    if src.default_split in splits:
        return src.default_split
    raise DataError(f"{src.data}: several splits ({', '.join(splits)}); choose one with --data-split")


def iter_rows(src: DataSource) -> tuple[str | None, Iterator[dict]]:
    """(the split read, or None where there is one; its rows as dicts), without holding them all."""
    ds_lib = _datasets()
    kind, data = src.kind, src.data
    try:
        if kind == "hub":
            dset, split = _hub(ds_lib, src)
            return split, _dataset_rows(dset)
        p = Path(data).expanduser()
        if kind == "disk":
            loaded = ds_lib.load_from_disk(str(p))  # memory-mapped Arrow
            if not isinstance(loaded, ds_lib.DatasetDict):
                return None, _dataset_rows(loaded)
            split = _choose_split(src, list(loaded))
            return split, _dataset_rows(loaded[split])
        if kind in FILE_FORMATS.values():
            if not p.is_file():
                raise DataError(f"{data}: cannot read data file (no such file)")
            return None, _file_rows(data, [str(p)])
        # A folder: splits from the file names, as the datasets library infers them (train-*, test-*, ...).
        from datasets.data_files import DataFilesDict, get_data_patterns

        splits = {str(k): list(v) for k, v in DataFilesDict.from_patterns(get_data_patterns(str(p)), str(p)).items()}
        split = _choose_split(src, list(splits))
        named = split if len(splits) > 1 or src.split else None
        if all(f.endswith(tuple(FILE_FORMATS)) for f in splits[split]):
            return named, _file_rows(data, splits[split])
        return named, _dataset_rows(ds_lib.load_dataset(str(p), split=split, streaming=True))  # JSON, CSV, ...
    except DataError:
        raise
    except Exception as e:  # the datasets library's own errors (bad files, unknown layout): one line
        raise DataError(f"{data}: cannot read the dataset ({type(e).__name__}: {e})") from e


def _dataset_rows(dset) -> Iterator[dict]:
    for cols in dset.iter(batch_size=ROWS_PER_BATCH):
        names = list(cols)
        for i in range(len(cols[names[0]]) if names else 0):
            yield {k: cols[k][i] for k in names}


def _file_rows(data: str, files: list[str]) -> Iterator[dict]:
    """Rows of Parquet files (a row group at a time) and Arrow files (memory-mapped, a record batch at a time),
    read with pyarrow directly: the datasets library's streaming reads a whole Parquet file into memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        try:
            if f.endswith(".parquet"):
                # pre_buffer off: pyarrow would read the whole file ahead; this way memory holds a row group.
                batches = pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=ROWS_PER_BATCH)
            else:
                source = pa.memory_map(f)
                try:
                    batches = iter(pa.ipc.open_stream(source))  # what datasets writes
                except pa.ArrowInvalid:
                    reader = pa.ipc.open_file(source)
                    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            for batch in batches:
                for s in range(0, batch.num_rows, ROWS_PER_BATCH):
                    yield from batch.slice(s, ROWS_PER_BATCH).to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{data}: cannot read {f} ({type(e).__name__}: {e})") from e


def _hub(ds_lib, src: DataSource):
    """A Hub dataset: the datasets library first (online, or its own offline cache), then the files of the
    local Hugging Face hub cache (`hf download NAME --repo-type dataset`), read as a local dataset."""
    name = src.data.removeprefix(HUB_PREFIX)
    split = src.split or src.default_split
    try:
        return ds_lib.load_dataset(name, src.config, split=split), split
    except (ConnectionError, FileNotFoundError, OSError) as first:
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(name, repo_type="dataset", local_files_only=True)
        except Exception:
            raise DataError(
                f"{src.data}: not reachable ({type(first).__name__}: {first}) and not in the local Hugging Face "
                "cache; download it once where there is a network (hf download NAME --repo-type dataset)"
            ) from first
        try:
            return ds_lib.load_dataset(folder, src.config, split=split), split
        except ValueError as e:  # an unknown split or configuration
            raise DataError(f"{src.data}: {e}") from e
