"""Where a training process reads its splits from (picklable, for spawned processes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from aimass.core.splits import read_split


@dataclass
class ServiceSplitSource:
    """Reads splits through the data service's ReadSplit, as workers on any host do."""

    address: str
    dataset_version: str
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def read(self, split: str) -> pa.Table:
        if split not in self._cache:
            self._cache[split] = read_split(self.address, self.dataset_version, split)
        return self._cache[split]


@dataclass
class TableSource:
    """Splits held in memory (tests, benchmarks, notebooks). Missing splits are empty."""

    tables: dict[str, pa.Table]

    def read(self, split: str) -> pa.Table:
        table = self.tables.get(split)
        if table is None:
            schema = next(iter(self.tables.values())).schema
            return schema.empty_table()
        return table

    def __getstate__(self) -> dict[str, bytes]:
        out = {}
        for name, table in self.tables.items():
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            out[name] = sink.getvalue().to_pybytes()
        return out

    def __setstate__(self, state: dict[str, bytes]) -> None:
        self.tables = {name: pa.ipc.open_stream(data).read_all() for name, data in state.items()}
