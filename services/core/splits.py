"""Reading a split through the data service: ReadSplit -> Arrow -> torch.

Used by training, evaluation and compression workers on any host.

    table = read_split("localhost:50052", "datasets/digits/versions/1", "train")
    loader = split_dataloader(table, label_column="label", batch_size=64, shuffle=True)

Training workers on other hosts read this way, never from the service's files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pyarrow as pa

from aimass.common.v1 import common_pb2
from aimass.data.v1 import data_pb2 as pb
from aimass.data.v1 import data_pb2_grpc

if TYPE_CHECKING:  # torch is imported lazily: the service itself does not need it
    from torch.utils.data import DataLoader

SPLITS = {
    "train": common_pb2.DATASET_SPLIT_TRAIN,
    "valid": common_pb2.DATASET_SPLIT_VALID,
    "test": common_pb2.DATASET_SPLIT_TEST,
}


def decode(responses: object) -> pa.Table:
    """ReadSplitResponse messages -> one table (each message is a whole IPC stream)."""
    batches = [
        batch
        for response in responses  # type: ignore[attr-defined]
        for batch in pa.ipc.open_stream(response.arrow_ipc).read_all().to_batches()
    ]
    return pa.Table.from_batches(batches)


def read_split(
    target: str | grpc.Channel,
    version: str,
    split: str = "train",
    columns: Sequence[str] = (),
    batch_size: int = 0,
) -> pa.Table:
    """The rows of one split of ``version`` ("datasets/d/versions/1") as an Arrow table."""
    channel = grpc.insecure_channel(target) if isinstance(target, str) else target
    try:
        stub = data_pb2_grpc.DataServiceStub(channel)
        request = pb.ReadSplitRequest(
            name=version, split=SPLITS[split], columns=list(columns), batch_size=batch_size
        )
        return decode(stub.ReadSplit(request))
    finally:
        if isinstance(target, str):
            channel.close()


def column_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A column as an array: fixed-size lists (images, NPZ rows) become a 2-d array."""
    array = column.combine_chunks()
    if pa.types.is_fixed_size_list(array.type):
        width = array.type.list_size
        return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return array.to_numpy(zero_copy_only=False)


def split_dataloader(
    table: pa.Table,
    label_column: str,
    feature_columns: Sequence[str] = (),
    *,
    batch_size: int = 64,
    shuffle: bool = False,
    classes: Sequence[str] | None = None,
) -> DataLoader:
    """A DataLoader of (features float32 [n, d], labels) from a split table.

    String labels map to their index in ``classes`` (default: sorted distinct labels), so
    every split of a version must get the same ``classes``.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    names = list(feature_columns) or [n for n in table.column_names if n != label_column]
    parts = [column_to_numpy(table.column(n)).reshape(table.num_rows, -1) for n in names]
    features = torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32))
    labels = column_to_numpy(table.column(label_column))
    if labels.dtype.kind in "OUS":
        order = list(classes) if classes is not None else sorted(set(labels.tolist()))
        index = {value: i for i, value in enumerate(order)}
        labels = np.array([index[v] for v in labels.tolist()], dtype=np.int64)
    dataset = TensorDataset(features, torch.from_numpy(np.ascontiguousarray(labels)))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)
