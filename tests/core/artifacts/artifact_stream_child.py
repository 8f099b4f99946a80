"""Child process of the large-stream test: streams N bytes through a store and back.

Run as ``python artifact_stream_child.py '<json>'`` with ``root``, ``size`` and ``s3``
(S3Settings fields or null). The content is generated on the fly, block by block, so the
process never holds more than a block of it; the store's own buffers are what the peak
RSS (VmHWM, reset once warmed up) measures. Prints one JSON line: sizes, sums,
seconds, MB/s, baseline and peak RSS.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator

from aimass.core.artifacts import ArtifactStore, open_artifact_store
from aimass.core.settings import S3Settings

BLOCK = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def reset_peak_rss() -> None:
    """Restarts the kernel's RSS high-water mark (VmHWM) of this process from now.

    ru_maxrss cannot serve: a child spawned by vfork + exec (as subprocess does) inherits
    the parent's peak in it, so a large pytest process would hide the child's own peak.
    """
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss() -> int:
    """The highest RSS since reset_peak_rss (VmHWM, in bytes)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


async def generated(size: int, digest: hashlib._Hash) -> AsyncIterator[bytes]:
    """size bytes of varied content, one fresh 1 MiB block at a time."""
    base = hashlib.sha256(b"aimass").digest() * (BLOCK // 32)
    for index, start in enumerate(range(0, size, BLOCK)):
        block = (index.to_bytes(8, "big") + base[8:])[: min(BLOCK, size - start)]
        digest.update(block)
        yield block


async def warm_up(store: ArtifactStore) -> None:
    """Loads what the store loads lazily (boto3 models, thread pool) before measuring."""
    stored = await store.put_bytes(b"warm-up" * 1000)
    async for _ in store.open_stream(stored.uri):
        pass


async def main(config: dict) -> dict:
    size = config["size"]
    s3 = S3Settings(**config["s3"]) if config["s3"] else None
    store = open_artifact_store(config["root"], s3)
    await warm_up(store)
    reset_peak_rss()
    baseline = current_rss()

    generated_sum = hashlib.sha256()
    started = time.perf_counter()
    stored = await store.put_stream(generated(size, generated_sum))
    put_s = time.perf_counter() - started

    started = time.perf_counter()
    read = 0
    async for chunk in store.open_stream(stored.uri):
        read += len(chunk)
    get_s = time.perf_counter() - started

    return {
        "stored_size": stored.size,
        "read_size": read,
        "stored_sha256": stored.sha256,
        "generated_sha256": generated_sum.hexdigest(),
        "put_s": put_s,
        "get_s": get_s,
        "put_mb_s": size / put_s / 1e6,
        "get_mb_s": size / get_s / 1e6,
        "baseline_rss": baseline,
        "peak_rss": peak_rss(),
        "rss_after": current_rss(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))))
