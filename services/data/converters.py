"""Converters from every source format to one canonical Parquet file (pyarrow).

CSV is cut into ~16 MB blocks at newlines (the header prepended to each) that pyarrow's
multi-threaded ``read_csv`` parses one after another, the first block fixing the column
types; JSONL is read in blocks by pyarrow's streaming reader. Memory stays a few blocks
wide whatever the file size, and a second thread writes the Parquet row groups while the
next block is parsed, so both cores work.
Parquet is copied batch by batch; NPZ arrays and image folders become a fixed-size list
column of features (images decoded with Pillow and resized to one size) and a label.
Errors name the line, key or file they come from.
"""

from __future__ import annotations

import csv
import io
import queue
import re
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

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
Rows = pa.RecordBatch | pa.Table


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


def write_parquet(batches: Iterator[Rows], out: Path, progress: Progress) -> Converted:
    """Writes batches to ``out`` from a second thread while the caller's thread reads."""
    pending: queue.Queue[Rows | None] = queue.Queue(maxsize=2)
    state: dict[str, object] = {}

    def write() -> None:
        writer: pq.ParquetWriter | None = None
        try:
            while (batch := pending.get()) is not None:
                if writer is None:
                    writer = pq.ParquetWriter(out, batch.schema, **WRITE_OPTIONS)
                writer.write(batch)
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
    error = state.get("error")
    if isinstance(error, pa.ArrowException | ValueError):
        # Columns Parquet cannot hold (an empty struct) or a later batch of another schema.
        out.unlink(missing_ok=True)
        raise InvalidArgument(
            "data_path", f"the rows cannot be stored as Parquet: {_short(str(error))}"
        ) from error
    if error is not None:
        raise error  # type: ignore[misc]
    if schema is None or rows == 0:
        out.unlink(missing_ok=True)
        raise InvalidArgument("data_path", "the source holds no rows")
    return Converted(rows, schema)


# ------------------------------------------------------------------------------ CSV

# Each block is parsed by pyarrow's multi-threaded reader on its own, so both cores parse
# while the writer thread compresses the previous block.
CSV_BLOCK_SIZE = 16 << 20
_CONVERSION_ERROR = re.compile(
    r"In CSV column #(\d+): CSV conversion error to (\S+): invalid value '(.*)'"
)


@dataclass
class _CsvReader:
    """Reads one CSV file in blocks cut at newlines, the header line prepended to each.

    A value may not span lines (unterminated quotes are refused), which is what makes
    cutting at newlines safe. The column types come from the first block and are imposed
    on every later block, so the schema cannot drift between row groups.
    """

    source: Path
    parse: pacsv.ParseOptions
    header: bool
    column_names: list[str]
    schema: pa.Schema | None = None
    head: bytes = b""
    width: int = 0

    def tables(self, progress: Progress) -> Iterator[pa.Table]:
        with self.source.open("rb") as handle:
            first_line = 1
            if self.header:
                self.head = handle.readline()
                if not self.head.strip():
                    raise InvalidArgument("data_path", f"{self.source.name} is empty")
                self.head = self.head if self.head.endswith(b"\n") else self.head + b"\n"
                _check_header_is_text(self.head, self.source.name)
                self.width = len(self._records(self.head)[0])
                first_line = 2
            for block in _blocks_at_newlines(handle, CSV_BLOCK_SIZE):
                table = self._read_block(block, first_line)
                progress(handle.tell(), -1)
                first_line += block.count(b"\n")
                if table.num_rows:
                    yield table

    def _read_block(self, block: bytes, first_line: int) -> pa.Table:
        read = pacsv.ReadOptions(use_threads=True, block_size=1 << 20)
        if not self.header:
            read.column_names = self.column_names or [
                f"c{i}" for i in range(self.width or len(self._records(block)[0]))
            ]
            self.width = len(read.column_names)
        convert = pacsv.ConvertOptions()
        if self.schema is not None:
            convert.column_types = self.schema
        try:
            table = pacsv.read_csv(
                io.BytesIO(self.head + block),
                read_options=read,
                parse_options=self.parse,
                convert_options=convert,
            )
        except pa.ArrowInvalid as err:
            raise self._error(err, block, first_line) from err
        _refuse_values_with_newlines(
            table, self.source.name, lambda: self._bad_line(block, first_line)
        )
        if self.schema is None:
            self.schema = _settled_schema(table.schema)
            table = table.cast(self.schema)
        return table

    def _error(self, err: pa.ArrowInvalid, block: bytes, first_line: int) -> InvalidArgument:
        text = str(err)
        conversion = _CONVERSION_ERROR.search(text)
        if conversion is not None and self.schema is not None:
            index, wanted, value = int(conversion[1]), conversion[2], conversion[3]
            line = self._line_with_value(block, first_line, index, value)
            column = self.schema.names[index]
            return InvalidArgument(
                "data_path",
                f"{self.source.name}: line {line}: column {column!r} holds {value!r}, but the "
                f"rows before made it {wanted}",
            )
        line = self._bad_line(block, first_line)
        where = f"line {line}" if line else "a line"
        return InvalidArgument(
            "data_path", f"{self.source.name}: malformed CSV at {where}: {_short(text)}"
        )

    def _records(self, data: bytes) -> list[list[str]]:
        text = io.StringIO(data.decode("utf-8", errors="replace"), newline="")
        return list(
            csv.reader(text, delimiter=self.parse.delimiter, quotechar=self.parse.quote_char)
        ) or [[]]

    def _bad_line(self, block: bytes, first_line: int) -> int:
        """The line of the first ragged or badly quoted record of ``block`` (0 if none)."""
        text = io.StringIO(block.decode("utf-8", errors="replace"), newline="")
        line = locate_bad_csv_line(text, self.parse, self.width or None)
        return first_line + line - 1 if line else 0

    def _line_with_value(self, block: bytes, first_line: int, index: int, value: str) -> int:
        text = io.StringIO(block.decode("utf-8", errors="replace"), newline="")
        reader = csv.reader(text, delimiter=self.parse.delimiter, quotechar=self.parse.quote_char)
        start = 1
        for record in reader:
            if len(record) > index and record[index] == value:
                return first_line + start - 1
            start = reader.line_num + 1
        return first_line


def _check_header_is_text(head: bytes, file_name: str) -> None:
    """Column names must be UTF-8 (values that are not become binary columns instead)."""
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidArgument(
            "data_path", f"{file_name}: line 1: the header is not UTF-8 text ({err.reason})"
        ) from err


def _blocks_at_newlines(handle: BinaryIO, size: int) -> Iterator[bytes]:
    """Blocks of about ``size`` bytes, each ending at a newline (the last one may not)."""
    rest = b""
    while chunk := handle.read(size):
        data = rest + chunk if rest else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            rest = data  # one line longer than a block: read on
            continue
        rest = data[cut + 1 :]
        yield data[: cut + 1]
    if rest.strip():
        yield rest


def _settled_schema(schema: pa.Schema) -> pa.Schema:
    """The first block's types, a column that was empty throughout becoming a string."""
    return pa.schema(
        [
            field.with_type(pa.string()) if pa.types.is_null(field.type) else field
            for field in schema
        ]
    )


def _csv_batches(source: Path, config: pb.DatasetConfig, progress: Progress) -> Iterator[Rows]:
    opts = config.csv
    reader = _CsvReader(
        source=source,
        parse=pacsv.ParseOptions(
            delimiter=opts.delimiter or ",", quote_char=opts.quote_char or '"'
        ),
        header=opts.header if opts.HasField("header") else True,
        column_names=list(opts.column_names),
    )
    return reader.tables(progress)


def _refuse_values_with_newlines(
    table: pa.Table, file_name: str, bad_line: Callable[[], int]
) -> None:
    """A quoted value spanning lines means an unterminated quote (newlines are not allowed
    in values), which pyarrow would otherwise swallow with the following rows."""
    for column in table.columns:
        if pa.types.is_string(column.type) and pc.any(pc.match_substring(column, "\n")).as_py():
            raise InvalidArgument(
                "data_path", f"{file_name}: malformed CSV at line {bad_line()}: unterminated quote"
            )


def locate_bad_csv_line(text: TextIO, parse: pacsv.ParseOptions, width: int | None = None) -> int:
    """The 1-based line of the first ragged or badly quoted record (0 if none found).

    Runs only after a failure, so the slow pure-Python scan costs nothing on good input.
    """
    reader = csv.reader(text, delimiter=parse.delimiter, quotechar=parse.quote_char)
    line = 1
    try:
        for record in reader:
            if any("\n" in value or "\r" in value for value in record):
                return line
            if width is None:
                width = len(record)
            elif record and len(record) != width:
                return line
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
    _refuse_null_lines(source)
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


_NULL_LINE = re.compile(rb"(?m)^[ \t\r]*null[ \t\r]*$")


def _refuse_null_lines(source: Path) -> None:
    """A line holding just ``null`` crashes pyarrow's JSON reader (segfault, pyarrow 21)
    when it starts a block, so such lines are refused before pyarrow sees the file."""
    line = 1
    with source.open("rb") as handle:
        for block in _blocks_at_newlines(handle, BLOCK_SIZE):
            found = _NULL_LINE.search(block)
            if found is not None:
                line += block.count(b"\n", 0, found.start())
                raise InvalidArgument(
                    "data_path",
                    f"{source.name}: malformed JSONL at line {line}: null is not a JSON object",
                )
            line += block.count(b"\n")


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
    features, labels = _npz_arrays(source, features_key, labels_key)
    if features.ndim == 0 or len(features) == 0:
        raise InvalidArgument("npz.features_key", f"{features_key!r} holds no rows")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(features)):
        raise InvalidArgument(
            "npz.labels_key",
            f"labels of shape {labels.shape} for {len(features)} feature rows (one per row)",
        )
    progress(source.stat().st_size, -1)
    try:
        columns = {features_key: tensor_column(features)}
        if labels is not None:
            columns[labels_key] = pa.array(labels)
    except (pa.ArrowException, ValueError) as err:
        problem = f"arrays of this dtype or shape are not supported: {_short(str(err))}"
        raise InvalidArgument("data_path", f"{source.name}: {problem}") from err
    table = pa.table(columns)
    yield from table.to_batches(max_chunksize=65536)


def _npz_arrays(
    source: Path, features_key: str, labels_key: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """The feature and label arrays of an .npz archive; a broken archive is InvalidArgument."""
    try:
        with np.load(source, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):  # a plain .npy file
                raise InvalidArgument("data_path", f"{source.name} is not an .npz archive")
            if features_key not in archive.files:
                raise InvalidArgument(
                    "npz.features_key", f"{features_key!r} is not in the archive ({archive.files})"
                )
            features = archive[features_key]
            labels = archive[labels_key] if labels_key in archive.files else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise InvalidArgument("data_path", f"{source.name} is not an .npz archive: {err}") from err
    return features, labels


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
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise InvalidArgument("data_path", f"{path.relative_to(source)}: not an image") from err
        except Image.DecompressionBombError as err:
            raise InvalidArgument(
                "data_path", f"{path.relative_to(source)}: image too large ({err})"
            ) from err
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


_BATCH_READERS: dict[str, Callable[[Path, pb.DatasetConfig, Progress], Iterator[Rows]]] = {
    "csv": _csv_batches,
    "jsonl": _jsonl_batches,
    "parquet": _parquet_batches,
    "npz": _npz_batches,
    "image_folder": _image_batches,
}
