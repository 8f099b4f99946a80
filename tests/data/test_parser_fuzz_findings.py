"""Inputs the fuzzer (tests/fuzz) found that broke the converters or the config check.

Each used to escape as another exception (or crash the process, for the JSONL ``null``
line) and must now be the service's InvalidArgument naming the problem.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aimass.core.errors import InvalidArgument
from aimass.data import config as cfg
from aimass.data import converters
from aimass.data.v1 import data_pb2 as pb


def convert(path: Path, fmt: str, config: pb.DatasetConfig | None = None) -> None:
    config = config or pb.DatasetConfig()
    converters.convert(path, fmt, config, path.parent / "out.parquet", lambda b, r: None)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"\x00\x00\x00\x00IEND\xaeB`\x82"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"null", "line 1: null is not a JSON object"),  # segfaulted pyarrow 21
        (b'{"a": 1}\n{"a": 2}\nnull\n', "line 3"),
        (b'{"":{}}', "cannot be stored as Parquet"),
    ],
    ids=["null-first", "null-later", "empty-struct"],
)
def test_jsonl_findings(tmp_path: Path, content: bytes, needle: str) -> None:
    (tmp_path / "f.jsonl").write_bytes(content)
    with pytest.raises(InvalidArgument, match=needle):
        convert(tmp_path / "f.jsonl", "jsonl")


def test_csv_header_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "f.csv").write_bytes(b"\x80\n\x00")
    with pytest.raises(InvalidArgument, match="header is not UTF-8"):
        convert(tmp_path / "f.csv", "csv")


@pytest.mark.parametrize(
    "arrays",
    [
        {"x": np.float32(1.0)},  # a scalar: len() of unsized object
        {"x": np.zeros((0, 3), np.float32)},  # no rows: reshape error
        {"x": np.zeros((2, 2), np.complex64)},  # no Arrow type
        {"x": np.zeros((2, 2), np.float32), "y": np.zeros((2, 2))},  # 2-d labels
    ],
    ids=["scalar", "no-rows", "complex", "2d-labels"],
)
def test_npz_findings(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    (tmp_path / "f.npz").write_bytes(npz_bytes(**arrays))
    with pytest.raises(InvalidArgument):
        convert(tmp_path / "f.npz", "npz")


def test_npz_with_a_broken_member_offset(tmp_path: Path) -> None:
    data = bytearray(npz_bytes(x=np.zeros((2, 2), np.float32)))
    data[20:28] = b"\xff" * 8  # the zip64 sizes of the member: an invalid seek
    (tmp_path / "f.npz").write_bytes(bytes(data))
    with pytest.raises(InvalidArgument):
        convert(tmp_path / "f.npz", "npz")


def test_image_decompression_bomb(tmp_path: Path) -> None:
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    with pytest.raises(InvalidArgument, match="too large"):
        convert(tmp_path / "images", "image_folder")


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (pb.DatasetConfig(image_folder=pb.ImageFolderOptions(width=-3, height=2)), "width"),
        (pb.DatasetConfig(image_folder=pb.ImageFolderOptions(width=8, height=10**6)), "height"),
        (pb.DatasetConfig(csv=pb.CsvOptions(quote_char="\ufeff")), "quote_char"),
        (pb.DatasetConfig(csv=pb.CsvOptions(delimiter="\n")), "delimiter"),
        (pb.DatasetConfig(csv=pb.CsvOptions(delimiter='"')), "quote_char"),
    ],
    ids=["negative-width", "huge-height", "non-ascii-quote", "newline-delimiter", "same-chars"],
)
def test_config_check_refuses_options_the_parsers_cannot_take(
    config: pb.DatasetConfig, field: str
) -> None:
    config.data_path = "f"
    with pytest.raises(InvalidArgument, match=field):
        cfg.validate(config)


def test_valid_images_still_convert(tmp_path: Path) -> None:
    (tmp_path / "images" / "a").mkdir(parents=True)
    Image.new("L", (4, 3)).save(tmp_path / "images" / "a" / "i.png")
    convert(tmp_path / "images", "image_folder")
