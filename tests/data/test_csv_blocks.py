"""The block-wise CSV converter: blocks cut at newlines give the rows of one whole read, the
first block fixes the types, and errors in later blocks still name their line."""

from __future__ import annotations

from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from aimass.core.errors import InvalidArgument
from aimass.data import converters
from aimass.data.v1 import data_pb2 as pb


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(converters, "CSV_BLOCK_SIZE", 64)


def convert(source: Path, out: Path) -> converters.Converted:
    return converters.convert(source, "csv", pb.DatasetConfig(), out, lambda b, r: None)


def test_many_blocks_give_the_rows_of_a_whole_read(tmp_path: Path) -> None:
    lines = ["id,x,name,empty"] + [f'{i},{i * 0.5},"n, {i}",' for i in range(200)]
    source = tmp_path / "d.csv"
    source.write_text("\n".join(lines))  # no newline at the end
    converted = convert(source, tmp_path / "d.parquet")
    table = pq.read_table(tmp_path / "d.parquet")
    assert converted.rows == 200
    assert pq.ParquetFile(tmp_path / "d.parquet").num_row_groups > 10
    whole = pacsv.read_csv(source)
    assert table.column("id").to_pylist() == whole.column("id").to_pylist()
    assert table.column("name").to_pylist() == whole.column("name").to_pylist()
    assert str(table.schema.field("empty").type) == "string"  # null throughout: a string


def test_a_value_that_breaks_the_first_blocks_type_names_line_and_column(tmp_path: Path) -> None:
    lines = ["id,x"] + [f"{i},{i}" for i in range(100)] + ["100,1.5", "101,3"]
    source = tmp_path / "d.csv"
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidArgument) as err:
        convert(source, tmp_path / "d.parquet")
    assert "d.csv: line 102: column 'x' holds '1.5'" in err.value.message
    assert "int64" in err.value.message


def test_a_ragged_row_in_a_later_block_names_its_line(tmp_path: Path) -> None:
    lines = ["a,b,c"] + [f"{i},{i},{i}" for i in range(60)] + ["1,2", "3,4,5"]
    source = tmp_path / "d.csv"
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidArgument) as err:
        convert(source, tmp_path / "d.parquet")
    assert "malformed CSV at line 62" in err.value.message
