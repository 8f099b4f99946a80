"""Benchmark of the data service's CSV -> Parquet converter and split streaming.

    .venv/bin/python tests/bench/bench_data.py [--size-mb 500] [--quick] [--out FILE]

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
import statistics
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


def _median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def report(mb: float, base: tuple[float, float], svc: tuple[float, float],
           streamed: float, direct: float) -> str:  # fmt: skip
    (base_s, base_rss), (svc_s, svc_rss) = base, svc
    return "\n".join(
        [
            f"CSV of {mb:.0f} MB (7 columns: id, 5 floats, a label), both cores; each conversion",
            "in its own child process (peak RSS is its ru_maxrss); medians of interleaved",
            "rounds. Ratios are aimass / baseline measured in the same run.",
            "",
            "| measure | aimass | baseline | ratio |",
            "|---|---|---|---|",
            f"| CSV->Parquet MB/s (baseline: read_csv + write_table) | {mb / svc_s:.1f} "
            f"| {mb / base_s:.1f} | {base_s / svc_s:.2f} |",
            f"| peak RSS MB | {svc_rss:.0f} | {base_rss:.0f} | {svc_rss / base_rss:.2f} |",
            f"| peak RSS / file size | {svc_rss / mb:.2f} | {base_rss / mb:.2f} | |",
            f"| split rows/s (ReadSplit's IPC path vs Parquet direct) | {streamed:,.0f} "
            f"| {direct:,.0f} | {streamed / direct:.2f} |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=500, help="size of the generated CSV")
    parser.add_argument("--quick", action="store_true", help="a 20 MB CSV (under a minute)")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    args = parser.parse_args()
    size_mb = 20 if args.quick else args.size_mb
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "big.csv"
        generate_csv(src, size_mb)
        mb = src.stat().st_size / 1e6
        # Interleaved rounds, the order alternating, medians kept: the machine is shared.
        bases, svcs = [], []
        for round_ in range(args.rounds):
            order = [(_baseline, bases), (_service, svcs)]
            for target, results in order if round_ % 2 == 0 else order[::-1]:
                out = Path(tmp) / "out.parquet"
                results.append(run_child(target, src, out))
                keep = target is _service and round_ == args.rounds - 1
                out.replace(Path(tmp) / "svc.parquet") if keep else out.unlink()
        base, svc = _median(bases), _median(svcs)
        streamed, direct = stream_rates(Path(tmp) / "svc.parquet")
    table = report(mb, base, svc, streamed, direct)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Data service benchmark\n\n{table}")


if __name__ == "__main__":
    main()
