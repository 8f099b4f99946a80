"""Converters from every source format to one canonical Parquet file (pyarrow).

CSV and JSONL are read in blocks (bounded memory) with pyarrow's multi-threaded type
inference, while a second thread writes the Parquet row groups, so both cores work.
Parquet is copied batch by batch; NPZ arrays and image folders become a fixed-size list
column of features (images decoded with Pillow and resized to one size) and a label.
Errors name the line, key or file they come from.
"""

from __future__ import annotations

import csv
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from aimass.core.errors import InvalidArgument
from aimass.data.v1 import data_pb2 as pb

BLOCK_SIZE = 8 << 20
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
# Fixed writer settings: the same rows always give the same bytes.
WRITE_OPTIONS = {"compression": "zstd", "write_statistics": True, "use_dictionary": True}

Progress = Callable[[int, int], None]  # (bytes_read, rows_converted)


@dataclass(frozen=True)
class Converted:
    """What a conversion wrote."""

    rows: int
    schema: pa.Schema


def convert(
    source: Path, fmt: str, config: pb.DatasetConfig, out: Path, progress: Progress
) -> Converted:
    """Converts ``source`` (format ``fmt``) to the Parquet file ``out``."""
    if source.is_file() and source.stat().st_size == 0:
        raise InvalidArgument("data_path", f"{source.name} is empty")
    batches = _BATCH_READERS[fmt](source, config, progress)
    return write_parquet(batches, out, progress)


def write_parquet(batches: Iterator[pa.RecordBatch], out: Path, progress: Progress) -> Converted:
    """Writes batches to ``out`` from a second thread while the caller's thread reads."""
    pending: queue.Queue[pa.RecordBatch | None] = queue.Queue(maxsize=2)
    state: dict[str, object] = {}

    def write() -> None:
        writer: pq.ParquetWriter | None = None
        try:
            while (batch := pending.get()) is not None:
                if writer is None:
                    writer = pq.ParquetWriter(out, batch.schema, **WRITE_OPTIONS)
                writer.write_batch(batch)
        except BaseException as err:  # handed to the reading thread
            state["error"] = err
            while pending.get() is not None:
                pass
        finally:
            if writer is not None:
                writer.close()

    thread = threading.Thread(target=write, name="parquet-writer")
    thread.start()
    rows, schema = 0, None
    try:
        for batch in batches:
            if schema is None:
                schema = batch.schema
            pending.put(batch)
            rows += batch.num_rows
            progress(-1, rows)
    finally:
        pending.put(None)
        thread.join()
    if "error" in state:
        raise state["error"]  # type: ignore[misc]
    if schema is None or rows == 0:
        out.unlink(missing_ok=True)
        raise InvalidArgument("data_path", "the source holds no rows")
    return Converted(rows, schema)


# ------------------------------------------------------------------------------ CSV


def _csv_batches(
    source: Path, config: pb.DatasetConfig, progress: Progress
) -> Iterator[pa.RecordBatch]:
    opts = config.csv
    header = opts.header if opts.HasField("header") else True
    read = pacsv.ReadOptions(block_size=BLOCK_SIZE, use_threads=True)
    if not header:
        if opts.column_names:
            read.column_names = list(opts.column_names)
        else:
            read.autogenerate_column_names = True
    parse = pacsv.ParseOptions(delimiter=opts.delimiter or ",", quote_char=opts.quote_char or '"')
    with source.open("rb") as handle:
        try:
            reader = pacsv.open_csv(handle, read_options=read, parse_options=parse)
            for batch in reader:
                _refuse_broken_quotes(batch, source, parse)
                progress(handle.tell(), -1)
                if not header and not opts.column_names:
                    batch = batch.rename_columns([f"c{i}" for i in range(batch.num_columns)])
                yield batch
        except pa.ArrowInvalid as err:
            text = str(err)
            if "Empty CSV file" in text:
                raise InvalidArgument("data_path", f"{source.name} is empty") from err
            line = locate_bad_csv_line(source, parse)
            where = f"line {line}" if line else "a line"
            raise InvalidArgument(
                "data_path", f"{source.name}: malformed CSV at {where}: {_short(text)}"
            ) from err


def _refuse_broken_quotes(batch: pa.RecordBatch, source: Path, parse: pacsv.ParseOptions) -> None:
    """A quoted value spanning lines means an unterminated quote (newlines are not allowed
    in values), which pyarrow would otherwise swallow with the following rows."""
    for column in batch.columns:
        if pa.types.is_string(column.type) and pc.any(pc.match_substring(column, "\n")).as_py():
            line = locate_bad_csv_line(source, parse)
            raise InvalidArgument(
                "data_path", f"{source.name}: malformed CSV at line {line}: unterminated quote"
            )


def locate_bad_csv_line(source: Path, parse: pacsv.ParseOptions) -> int:
    """The 1-based line of the first ragged or badly quoted record (0 if none found).

    Runs only after a failure, so the slow pure-Python scan costs nothing on good input.
    """
    with source.open(newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle, delimiter=parse.delimiter, quotechar=parse.quote_char)
        width = None
        line = 1
        try:
            for record in reader:
                if any("\n" in value or "\r" in value for value in record):
                    return line
                if width is None:
                    width = len(record)
                elif record and len(record) != width:
                    return reader.line_num
                line = reader.line_num + 1
        except csv.Error:
            return line
    return 0


def _short(text: str) -> str:
    return text.splitlines()[0][:200] if text else "parse error"


# ---------------------------------------------------------------------------- JSONL


def _jsonl_batches(
    source: Path, _config: pb.DatasetConfig, progress: Progress
) -> Iterator[pa.RecordBatch]:
    read = pajson.ReadOptions(block_size=BLOCK_SIZE, use_threads=True)
    with source.open("rb") as handle:
        try:
            for batch in pajson.open_json(handle, read_options=read):
                progress(handle.tell(), -1)
                yield batch
        except pa.ArrowInvalid as err:
            line = _locate_bad_json_line(source)
            raise InvalidArgument(
                "data_path", f"{source.name}: malformed JSONL at line {line}: {_short(str(err))}"
            ) from err


def _locate_bad_json_line(source: Path) -> int:
    import json

    with source.open(encoding="utf-8", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            if text.strip():
                try:
                    if not isinstance(json.loads(text), dict):
                        return number
                except ValueError:
                    return number
    return 0


# -------------------------------------------------------------------------- Parquet


def _parquet_batches(
    source: Path, _config: pb.DatasetConfig, progress: Progress
) -> Iterator[pa.RecordBatch]:
    try:
        file = pq.ParquetFile(source)
    except (pa.ArrowInvalid, OSError) as err:
        raise InvalidArgument(
            "data_path", f"{source.name} is not Parquet: {_short(str(err))}"
        ) from err
    read = 0
    for group in range(file.num_row_groups):
        read += file.metadata.row_group(group).total_byte_size
        for batch in file.iter_batches(row_groups=[group]):
            progress(read, -1)
            yield batch


# ------------------------------------------------------------------------------ NPZ


def _npz_batches(
    source: Path, config: pb.DatasetConfig, progress: Progress
) -> Iterator[pa.RecordBatch]:
    features_key = config.npz.features_key or "x"
    labels_key = config.npz.labels_key or "y"
    try:
        archive = np.load(source, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise InvalidArgument("data_path", f"{source.name} is not an .npz archive: {err}") from err
    with archive:
        if features_key not in archive.files:
            raise InvalidArgument(
                "npz.features_key", f"{features_key!r} is not in the archive ({archive.files})"
            )
        features = archive[features_key]
        labels = archive[labels_key] if labels_key in archive.files else None
    if labels is not None and len(labels) != len(features):
        raise InvalidArgument(
            "npz.labels_key", f"{len(labels)} labels for {len(features)} feature rows"
        )
    progress(source.stat().st_size, -1)
    columns = {features_key: tensor_column(features)}
    if labels is not None:
        columns[labels_key] = pa.array(labels.reshape(len(labels)))
    table = pa.table(columns)
    yield from table.to_batches(max_chunksize=65536)


def tensor_column(array: np.ndarray) -> pa.Array:
    """Rows of an n-d array as a fixed_size_list column (a 1-d array stays scalar)."""
    if array.ndim == 1:
        return pa.array(array)
    flat = np.ascontiguousarray(array.reshape(len(array), -1))
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


# --------------------------------------------------------------------- image folder


def _image_batches(
    source: Path, config: pb.DatasetConfig, progress: Progress
) -> Iterator[pa.RecordBatch]:
    from PIL import Image, UnidentifiedImageError

    if not source.is_dir():
        raise InvalidArgument("data_path", f"{source.name} is not a folder of class folders")
    opts = config.image_folder
    extensions = tuple(e.lower() for e in opts.extensions) or IMAGE_EXTENSIONS
    mode = "L" if opts.channels == 1 else "RGB"
    size = (opts.width, opts.height) if opts.width and opts.height else None
    read = 0
    batch_images: list[np.ndarray] = []
    batch_labels: list[str] = []
    for label, path in _image_files(source, extensions):
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                size = size or image.size
                if image.size != size:
                    image = image.resize(size, Image.Resampling.BILINEAR)
                batch_images.append(np.asarray(image, dtype=np.uint8).reshape(-1))
        except (UnidentifiedImageError, OSError) as err:
            raise InvalidArgument("data_path", f"{path.relative_to(source)}: not an image") from err
        batch_labels.append(label)
        read += path.stat().st_size
        if len(batch_images) == 4096:
            progress(read, -1)
            yield _image_batch(batch_images, batch_labels)
            batch_images, batch_labels = [], []
    progress(read, -1)
    if batch_images:
        yield _image_batch(batch_images, batch_labels)


def _image_files(root: Path, extensions: tuple[str, ...]) -> Iterable[tuple[str, Path]]:
    """(class, file) in sorted order, so the rows never depend on directory listing order."""
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in extensions:
                yield folder.name, path


def _image_batch(images: list[np.ndarray], labels: list[str]) -> pa.RecordBatch:
    return pa.record_batch(
        {"image": tensor_column(np.stack(images)), "label": pa.array(labels, pa.string())}
    )


_BATCH_READERS: dict[
    str, Callable[[Path, pb.DatasetConfig, Progress], Iterator[pa.RecordBatch]]
] = {
    "csv": _csv_batches,
    "jsonl": _jsonl_batches,
    "parquet": _parquet_batches,
    "npz": _npz_batches,
    "image_folder": _image_batches,
}
