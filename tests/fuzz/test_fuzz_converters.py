"""The data service's parsers (services/data/converters.py) under random and mutated files.

For CSV, JSONL, NPZ and image folders, hypothesis writes random bytes, valid files with
bytes flipped, cut or inserted, and generated near-valid files (ragged CSV, JSON lines
that are not objects, arrays of odd shapes and dtypes, images of every mode), with the
format's options drawn from the option message's descriptor half of the time. Property:
the conversion either succeeds with rows or raises the service's InvalidArgument with a
message, never another exception, and ends within CONVERT_TIMEOUT_S (no hang). Options
that the service's own config check (``config.validate``) refuses never reach a parser
there, so they are checked the same way here first.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from aimass.core.errors import InvalidArgument
from aimass.data import config as cfg
from aimass.data import converters
from aimass.data.v1 import data_pb2 as pb
from tests.fuzz.harness import fuzz_examples
from tests.fuzz.protogen import MessageStrategies

CONVERT_TIMEOUT_S = 20.0
VALID_CSV = b"a,b,label\n1,2.5,x\n3,4.5,y\n5,,x\n"
VALID_JSONL = b'{"a": 1, "b": "x"}\n{"a": 2, "b": null}\n{"a": 3.5, "b": "z"}\n'
SETTINGS = settings(
    max_examples=fuzz_examples(40),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def valid_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.arange(12, dtype=np.float32).reshape(4, 3), y=np.array([0, 1, 0, 1]))
    return buffer.getvalue()


def valid_png(mode: str = "L", size: tuple[int, int] = (4, 3)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"\x00\x00\x00\x00IEND\xaeB`\x82"


# ------------------------------------------------------------------- strategies


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with a few bytes flipped, removed or inserted, or cut short."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        if action == "flip":
            data[at] = draw(st.integers(0, 255))
        elif action == "delete":
            del data[at]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:]
    return bytes(data)


def contents(valid: bytes, generated: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=200), mutated(valid), generated)


cells = st.one_of(
    st.text(max_size=6), st.integers().map(str), st.floats().map(str),
    st.sampled_from(['"', '""', '"a', "a\nb", '"a,b"', "", "NaN", "1e999"]),
)  # fmt: skip


@st.composite
def csv_text(draw: st.DrawFn) -> bytes:
    rows = draw(st.lists(st.lists(cells, min_size=1, max_size=4), max_size=6))
    delimiter = draw(st.sampled_from([",", ";", "\t"]))
    ending = draw(st.sampled_from(["\n", "\r\n", ""]))
    return ending.join(delimiter.join(row) for row in rows).encode("utf-8", "surrogatepass")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def jsonl_text(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(json_values, max_size=6))
    return "\n".join(json.dumps(line) for line in lines).encode()


DTYPES = ["float32", "float64", "int8", "int64", "uint16", "bool", "complex64", "<U3", "S2"]


@st.composite
def npz_archives(draw: st.DrawFn) -> bytes:
    arrays = {}
    for key in draw(
        st.lists(st.sampled_from(["x", "y", "z", "features"]), max_size=3, unique=True)
    ):
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        arrays[key] = np.zeros(shape, dtype=dtype)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


IMAGE_MODES = ["1", "L", "P", "RGB", "RGBA", "I", "F", "LA", "CMYK"]


@st.composite
def image_files(draw: st.DrawFn) -> bytes:
    mode = draw(st.sampled_from(IMAGE_MODES))
    size = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    fmt = "TIFF" if mode in ("I", "F", "CMYK") else "PNG"
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return buffer.getvalue()


def options(message: type) -> st.SearchStrategy[object]:
    """The format's options: empty half of the time, random (descriptor-driven) otherwise."""
    return st.one_of(st.just(message()), MessageStrategies(depth=1).messages(message.DESCRIPTOR))


# ------------------------------------------------------------------- the check


def converts_cleanly(write: Callable[[Path], Path], fmt: str, config: pb.DatasetConfig) -> None:
    """Converts what ``write`` puts in a fresh folder; InvalidArgument or rows, in time."""
    try:
        cfg.validate(config)
    except InvalidArgument:
        return  # refused by the service before any parser runs
    work = Path(tempfile.mkdtemp(prefix="fuzz-convert-"))
    try:
        source = write(work)
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(
                converters.convert, source, fmt, config, work / "out.parquet", lambda b, r: None
            )
            try:
                converted = future.result(timeout=CONVERT_TIMEOUT_S)
            except InvalidArgument as err:
                message = err.message
            except FutureTimeout:
                pytest.fail(f"{fmt} conversion still running after {CONVERT_TIMEOUT_S}s")
            else:
                message = None
        if message is not None:
            assert message.strip(), "InvalidArgument without a message"
            return
        assert converted.rows > 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_file(name: str, data: bytes) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return write


# ------------------------------------------------------------------- properties


@SETTINGS
@given(data=contents(VALID_CSV, csv_text()), csv=options(pb.CsvOptions))
@example(data=b"a,b\n1,2\n", csv=pb.CsvOptions(column_names=["only"], header=False))
def test_csv_parser_refuses_bad_files_cleanly(data: bytes, csv: pb.CsvOptions) -> None:
    config = pb.DatasetConfig(data_path="f.csv", format=cfg.FORMATS["csv"], csv=csv)
    converts_cleanly(write_file("f.csv", data), "csv", config)


@SETTINGS
@given(data=contents(VALID_JSONL, jsonl_text()))
def test_jsonl_parser_refuses_bad_files_cleanly(data: bytes) -> None:
    config = pb.DatasetConfig(data_path="f.jsonl", format=cfg.FORMATS["jsonl"])
    converts_cleanly(write_file("f.jsonl", data), "jsonl", config)


@SETTINGS
@given(data=contents(valid_npz(), npz_archives()), npz=options(pb.NpzOptions))
def test_npz_parser_refuses_bad_files_cleanly(data: bytes, npz: pb.NpzOptions) -> None:
    config = pb.DatasetConfig(data_path="f.npz", format=cfg.FORMATS["npz"], npz=npz)
    converts_cleanly(write_file("f.npz", data), "npz", config)


@SETTINGS
@given(
    files=st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.sampled_from(["i.png", "j.jpg", "k.bmp", "l.PNG"]),
            contents(valid_png(), image_files()),
        ),
        max_size=4,
    ),
    images=options(pb.ImageFolderOptions),
)
@example(files=[("a", "bomb.png", png_claiming(100_000, 100_000))], images=pb.ImageFolderOptions())
@example(files=[("a", "i.png", valid_png())], images=pb.ImageFolderOptions(width=-3, height=2))
def test_image_folder_parser_refuses_bad_files_cleanly(
    files: list[tuple[str, str, bytes]], images: pb.ImageFolderOptions
) -> None:
    def write(folder: Path) -> Path:
        root = folder / "images"
        root.mkdir()
        for label, name, data in files:
            (root / label).mkdir(exist_ok=True)
            (root / label / name).write_bytes(data)
        return root

    config = pb.DatasetConfig(
        data_path="images", format=cfg.FORMATS["image_folder"], image_folder=images
    )
    converts_cleanly(write, "image_folder", config)
