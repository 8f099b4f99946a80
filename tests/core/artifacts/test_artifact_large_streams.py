"""A stream larger than 200 MB goes through put_stream and open_stream with bounded memory.

The transfer runs in a child process (artifact_stream_child.py) so that its peak RSS (the
kernel's high-water mark, VmHWM, reset once the child warmed up) measures the store
alone: not pytest, and not the moto server, which lives in this process. The child
generates the content on the fly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SIZE = 210 * 1024 * 1024  # 220 MB
MB = 1e6
# Far below the stream's size: the store must not hold the stream, only a few parts.
MAX_RSS_GROWTH = 100 * MB
CHILD = Path(__file__).with_name("artifact_stream_child.py")


def run_child(root: str, s3: dict | None) -> dict:
    config = json.dumps({"root": root, "size": SIZE, "s3": s3})
    done = subprocess.run(
        [sys.executable, str(CHILD), config], capture_output=True, text=True, timeout=280
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_and_report(name: str, result: dict, capsys: pytest.CaptureFixture[str]) -> None:
    growth = result["peak_rss"] - result["baseline_rss"]
    with capsys.disabled():
        print(
            f"\n[{name}] {SIZE / MB:.0f} MB: put {result['put_mb_s']:.0f} MB/s "
            f"({result['put_s']:.1f} s), get {result['get_mb_s']:.0f} MB/s "
            f"({result['get_s']:.1f} s), baseline RSS {result['baseline_rss'] / MB:.0f} MB, "
            f"peak RSS {result['peak_rss'] / MB:.0f} MB (growth {growth / MB:.1f} MB)"
        )
    assert result["stored_size"] == SIZE
    assert result["read_size"] == SIZE
    assert result["stored_sha256"] == result["generated_sha256"]
    assert growth < MAX_RSS_GROWTH


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_streams_a_large_file_with_bounded_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    result = run_child((tmp_path / "artifacts").as_uri(), None)
    check_and_report("local", result, capsys)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_s3_streams_a_large_file_with_bounded_memory(
    s3_bucket: str, s3_server, capsys: pytest.CaptureFixture[str]
):
    # The default part size (16 MiB), as a service would run with.
    s3 = s3_server.settings.model_copy(update={"part_size_mb": 16}).model_dump()
    result = run_child(f"s3://{s3_bucket}/big", s3)
    check_and_report("s3", result, capsys)
