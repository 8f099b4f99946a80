"""Benchmark of the data service's CSV -> Parquet converter and split streaming.

    .venv/bin/python tests/bench/bench_data.py [--size-mb 500]

Generates a CSV of about --size-mb MB in a temp dir, then in child processes (so each
peak RSS, ru_maxrss, is its own): (1) plain pyarrow.csv.read_csv + pyarrow.parquet.write_table,
(2) aimass.data.converters.convert. Then split streaming: the converted file sent as the
ReadSplit RPC does (record batches as Arrow IPC, decoded again) vs reading the Parquet file
directly. Prints a markdown table with ratios against the baselines of the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def generate_csv(path: Path, size_mb: int) -> None:
    rng = np.random.default_rng(0)
    header = "id,a,b,c,d,e,label\n"
    with path.open("w") as handle:
        handle.write(header)
        start = 0
        while handle.tell() < size_mb * 1_000_000:
            n = 200_000
            block = np.column_stack(
                [np.arange(start, start + n), rng.random((n, 5)) * 1000, rng.integers(0, 10, n)]
            )
            np.savetxt(handle, block, fmt=["%d", "%.6f", "%.6f", "%.6f", "%.6f", "%.6f", "%d"],
                       delimiter=",")  # fmt: skip
            start += n


def _baseline(src: str, out: str, result: mp.Queue) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    t = time.perf_counter()
    pq.write_table(pacsv.read_csv(src), out, compression="zstd")
    result.put((time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def _service(src: str, out: str, result: mp.Queue) -> None:
    from aimass.data import converters
    from aimass.data.v1 import data_pb2 as pb

    t = time.perf_counter()
    converters.convert(Path(src), "csv", pb.DatasetConfig(), Path(out), lambda b, r: None)
    result.put((time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def run_child(target, src: Path, out: Path) -> tuple[float, float]:
    context = mp.get_context("spawn")
    queue: mp.Queue = context.Queue()
    process = context.Process(target=target, args=(str(src), str(out), queue))
    process.start()
    seconds, rss_kb = queue.get()
    process.join()
    return seconds, rss_kb / 1024


def stream_rates(parquet: Path) -> tuple[float, float]:
    """rows/s: ReadSplit's encode+decode path vs iterating the Parquet file directly."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aimass.data.api import _ipc

    file = pq.ParquetFile(parquet)
    t = time.perf_counter()
    rows = sum(b.num_rows for b in file.iter_batches(batch_size=8192))
    direct = rows / (time.perf_counter() - t)
    t = time.perf_counter()
    rows = 0
    for batch in pq.ParquetFile(parquet).iter_batches(batch_size=8192):
        rows += pa.ipc.open_stream(_ipc(batch)).read_all().num_rows
    streamed = rows / (time.perf_counter() - t)
    return streamed, direct


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "big.csv"
        generate_csv(src, args.size_mb)
        mb = src.stat().st_size / 1e6
        base_s, base_rss = run_child(_baseline, src, Path(tmp) / "base.parquet")
        svc_s, svc_rss = run_child(_service, src, Path(tmp) / "svc.parquet")
        streamed, direct = stream_rates(Path(tmp) / "svc.parquet")
    print(f"CSV of {mb:.0f} MB\n")
    print("| measure | aimass | baseline | ratio |\n|---|---|---|---|")
    print(f"| CSV->Parquet MB/s | {mb / svc_s:.1f} | {mb / base_s:.1f} | {base_s / svc_s:.2f} |")
    print(f"| peak RSS MB | {svc_rss:.0f} | {base_rss:.0f} | {svc_rss / base_rss:.2f} |")
    print(f"| split rows/s (IPC) | {streamed:,.0f} | {direct:,.0f} | {streamed / direct:.2f} |")


if __name__ == "__main__":
    main()
