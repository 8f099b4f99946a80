"""The artifact store's contract, run against both backends (local folder and S3)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from pathlib import Path

import grpc
import pytest
from artifact_support import Backdoor, MiB, pattern, read_all, stream_of

from aimass.core.artifacts import (
    ArtifactStore,
    IntegrityError,
    LocalArtifactStore,
    S3ArtifactStore,
    content_key,
    open_artifact_store,
)
from aimass.core.errors import InvalidArgument, NotFound


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(data: bytes, sizes: tuple[int, ...]) -> list[bytes]:
    """Cuts data into blocks of the given sizes, cycling through them."""
    blocks, start, index = [], 0, 0
    while start < len(data):
        size = sizes[index % len(sizes)]
        blocks.append(data[start : start + size])
        start += size
        index += 1
    return blocks


class Boom(RuntimeError):
    pass


async def failing_stream(data: bytes, fail_after: int):
    """Yields data in 1 MiB blocks, then raises once fail_after bytes went out."""
    sent = 0
    for block in split(data, (MiB,)):
        if sent >= fail_after:
            raise Boom("the client went away")
        yield block
        sent += len(block)
    raise Boom("the client went away")


# -- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 5 * MiB - 1, 12 * MiB + 3])
@pytest.mark.parametrize("sum_known", [False, True])
async def test_put_stream_round_trips_under_its_address(
    store: ArtifactStore, size: int, sum_known: bool
):
    data = pattern(size, seed=size)
    blocks = split(data, (65536, 3 * MiB + 17, 1))
    expected = sha(data) if sum_known else None

    stored = await store.put_stream(stream_of(blocks), expected_sha256=expected)

    assert stored.sha256 == sha(data)
    assert stored.size == size
    assert stored.uri == f"{store.root_uri}/{content_key(sha(data))}"
    assert stored.uri.endswith(f"/sha256/{sha(data)[:2]}/{sha(data)[2:4]}/{sha(data)}")
    assert await read_all(store, stored.uri) == data
    assert await store.exists(stored.uri)
    assert await store.stat(stored.uri) == stored


async def test_put_bytes_and_put_file_store_by_content(store: ArtifactStore, tmp_path: Path):
    data = pattern(3 * MiB + 5, seed=3)
    source = tmp_path / "weights.bin"
    source.write_bytes(data)

    from_file = await store.put_file(source)
    from_bytes = await store.put_bytes(data)

    assert from_file == from_bytes
    assert from_file.sha256 == sha(data)


async def test_identical_content_is_stored_once(store: ArtifactStore, backdoor: Backdoor):
    data = pattern(7 * MiB, seed=1)

    first = await store.put_stream(stream_of(split(data, (MiB,))))
    second = await store.put_stream(stream_of(split(data, (777_777,))))
    third = await store.put_bytes(data, expected_sha256=sha(data))

    assert first == second == third
    assert backdoor.object_keys() == [content_key(sha(data))]
    assert backdoor.leftovers() == []


async def test_a_stored_object_with_the_wrong_size_is_repaired_by_a_new_put(
    store: ArtifactStore, backdoor: Backdoor
):
    data = pattern(1000, seed=2)
    stored = await store.put_bytes(data)
    backdoor.overwrite(content_key(stored.sha256), data[:10])

    await store.put_bytes(data)

    assert await read_all(store, stored.uri) == data


async def test_get_file_downloads_and_verifies(store: ArtifactStore, tmp_path: Path):
    data = pattern(6 * MiB, seed=4)
    stored = await store.put_bytes(data)
    dest = tmp_path / "out" / "model.onnx"

    got = await store.get_file(stored.uri, dest)

    assert got == stored
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["model.onnx"]


# -- atomicity --------------------------------------------------------------------------


@pytest.mark.parametrize("fail_after", [0, 2 * MiB, 11 * MiB])
async def test_a_stream_that_fails_midway_leaves_nothing(
    store: ArtifactStore, backdoor: Backdoor, fail_after: int
):
    data = pattern(16 * MiB, seed=5)

    with pytest.raises(Boom):
        await store.put_stream(failing_stream(data, fail_after))
    with pytest.raises(Boom):
        await store.put_stream(failing_stream(data, fail_after), expected_sha256=sha(data))
    with pytest.raises(Boom):
        await store.put_named("bundles/b.tar.gz", failing_stream(data, fail_after))

    assert backdoor.object_keys() == []
    assert backdoor.leftovers() == []


async def test_a_cancelled_put_leaves_nothing(store: ArtifactStore, backdoor: Backdoor):
    sent_enough = asyncio.Event()

    async def endless():
        for index in range(10_000):
            if index == 12:
                sent_enough.set()
            yield pattern(MiB, seed=index % 7)
        await asyncio.Event().wait()

    task = asyncio.create_task(store.put_stream(endless()))
    await sent_enough.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert backdoor.object_keys() == []
    assert backdoor.leftovers() == []


@pytest.mark.parametrize("size", [100, 11 * MiB])
async def test_a_sum_mismatch_is_refused_and_leaves_nothing(
    store: ArtifactStore, backdoor: Backdoor, size: int
):
    data = pattern(size, seed=6)
    wrong = sha(b"something else")

    with pytest.raises(InvalidArgument) as raised:
        await store.put_stream(stream_of(split(data, (MiB,))), expected_sha256=wrong)

    assert raised.value.violations[0].field == "sha256"
    assert wrong in raised.value.message
    assert sha(data) in raised.value.message
    assert not await store.exists(f"{store.root_uri}/{content_key(wrong)}")
    assert backdoor.object_keys() == []
    assert backdoor.leftovers() == []


@pytest.mark.parametrize("claimed", [99, 101, 6 * MiB])
async def test_a_size_mismatch_is_refused_and_leaves_nothing(
    store: ArtifactStore, backdoor: Backdoor, claimed: int
):
    data = pattern(100 if claimed < MiB else 11 * MiB, seed=7)

    with pytest.raises(InvalidArgument) as raised:
        await store.put_stream(stream_of(split(data, (MiB,))), expected_size=claimed)

    assert raised.value.violations[0].field == "size"
    assert backdoor.object_keys() == []
    assert backdoor.leftovers() == []


async def test_a_stream_claiming_stored_content_is_still_checked(
    store: ArtifactStore, backdoor: Backdoor
):
    data = pattern(11 * MiB, seed=8)
    stored = await store.put_bytes(data)
    impostor = pattern(len(data), seed=9)

    with pytest.raises(InvalidArgument) as raised:
        await store.put_stream(
            stream_of(split(impostor, (MiB,))), expected_sha256=sha(data), expected_size=len(data)
        )

    assert raised.value.violations[0].field == "sha256"
    assert await read_all(store, stored.uri) == data
    assert backdoor.leftovers() == []


# -- integrity on read ------------------------------------------------------------------


@pytest.mark.parametrize("size", [10, 6 * MiB])
async def test_corrupt_bytes_raise_integrity_error_naming_the_uri(
    store: ArtifactStore, backdoor: Backdoor, tmp_path: Path, size: int
):
    data = pattern(size, seed=10)
    stored = await store.put_bytes(data)
    corrupt = bytearray(data)
    corrupt[size // 2] ^= 0xFF
    backdoor.overwrite(content_key(stored.sha256), bytes(corrupt))

    with pytest.raises(IntegrityError) as raised:
        await read_all(store, stored.uri)
    assert raised.value.code == grpc.StatusCode.DATA_LOSS
    assert stored.uri in raised.value.message
    assert raised.value.actual_sha256 == sha(bytes(corrupt))

    dest = tmp_path / "dl" / "model.bin"
    with pytest.raises(IntegrityError):
        await store.get_file(stored.uri, dest)
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []


async def test_reads_from_an_offset_are_not_verified_but_correct(store: ArtifactStore):
    data = pattern(6 * MiB + 11, seed=11)
    stored = await store.put_bytes(data)

    for offset in (1, MiB, len(data) - 1):
        assert await read_all(store, stored.uri, offset=offset) == data[offset:]
    assert await read_all(store, stored.uri, offset=len(data)) == b""


async def test_chunks_never_exceed_chunk_size(store: ArtifactStore):
    data = pattern(300_001, seed=12)
    stored = await store.put_bytes(data)

    chunks = [c async for c in store.open_stream(stored.uri, offset=7, chunk_size=65_536)]

    assert b"".join(chunks) == data[7:]
    assert max(len(c) for c in chunks) <= 65_536


async def test_an_offset_past_the_end_is_refused(store: ArtifactStore):
    stored = await store.put_bytes(b"0123456789")

    with pytest.raises(InvalidArgument) as raised:
        await read_all(store, stored.uri, offset=11)
    assert raised.value.violations[0].field == "offset"
    with pytest.raises(InvalidArgument):
        store.open_stream(stored.uri, offset=-1)
    with pytest.raises(InvalidArgument):
        store.open_stream(stored.uri, chunk_size=0)


# -- named objects ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [5, 11 * MiB])
async def test_named_objects_round_trip_and_are_replaced_atomically(
    store: ArtifactStore, backdoor: Backdoor, size: int
):
    first, second = pattern(size, seed=13), pattern(size + 1, seed=14)

    stored = await store.put_named("reports/eval-7/report.html", stream_of(split(first, (MiB,))))
    assert stored.uri == f"{store.root_uri}/reports/eval-7/report.html"
    assert (stored.sha256, stored.size) == (sha(first), size)
    assert await store.stat(stored.uri) == stored

    again = await store.put_named("reports/eval-7/report.html", stream_of([second]))
    assert again.sha256 == sha(second)
    assert await read_all(store, stored.uri, expected_sha256=sha(second)) == second
    assert backdoor.object_keys() == ["reports/eval-7/report.html"]
    assert backdoor.leftovers() == []


async def test_a_named_object_is_verified_against_a_given_sum(store: ArtifactStore):
    stored = await store.put_named("bundles/x.tar.gz", stream_of([b"bundle bytes"]))

    with pytest.raises(IntegrityError):
        await read_all(store, stored.uri, expected_sha256=sha(b"other bytes"))


async def test_a_named_put_checks_expected_sum(store: ArtifactStore, backdoor: Backdoor):
    with pytest.raises(InvalidArgument) as raised:
        await store.put_named(
            "bundles/x.tar.gz", stream_of([b"bundle"]), expected_sha256=sha(b"other")
        )
    assert raised.value.violations[0].field == "sha256"
    assert backdoor.object_keys() == []


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../escape",
        "a/../../b",
        "a//b",
        "a/./b",
        "%2e%2e/x",
        "a\\b",
        "a\x00b",
        "sha256/ab/cd/ef",
        ".staging/x",
        "a b",
        "a?b",
        "a/",
    ],
)
async def test_bad_named_keys_are_refused(store: ArtifactStore, backdoor: Backdoor, key: str):
    with pytest.raises(InvalidArgument) as raised:
        await store.put_named(key, stream_of([b"x"]))
    assert raised.value.violations[0].field == "relative_key"
    assert backdoor.object_keys() == []


# -- missing objects and bad URIs -------------------------------------------------------


async def test_a_missing_object_raises_not_found_naming_the_uri(
    store: ArtifactStore, tmp_path: Path
):
    uri = f"{store.root_uri}/{content_key(sha(b'never stored'))}"

    assert not await store.exists(uri)
    for attempt in (
        read_all(store, uri),
        read_all(store, uri, offset=3),
        store.stat(uri),
        store.delete(uri),
        store.get_file(uri, tmp_path / "x"),
        store.stat(f"{store.root_uri}/reports/none.html"),
    ):
        with pytest.raises(NotFound) as raised:
            await attempt
        assert store.root_uri in raised.value.message
    assert not (tmp_path / "x").exists()


async def test_delete_removes_an_object(store: ArtifactStore):
    stored = await store.put_bytes(b"short-lived")

    await store.delete(stored.uri)

    assert not await store.exists(stored.uri)
    with pytest.raises(NotFound):
        await store.delete(stored.uri)


BAD_SUFFIXES = [
    "",
    "/",
    "//etc/passwd",
    "/../outside",
    "/a/../../outside",
    "/%2e%2e/outside",
    "/%2E%2E%2Foutside",
    "/a\\..\\b",
    "/a\x00b",
    "/a//b",
    "/./a",
    "/sha256/ab/cd/not-a-digest",
    "/sha256/00/00/" + "ab" * 32,
    "/a?x=1",
    "/a#frag",
]


@pytest.mark.parametrize("suffix", BAD_SUFFIXES)
async def test_bad_uris_are_refused_naming_the_uri_field(store: ArtifactStore, suffix: str):
    uri = store.root_uri + suffix
    for attempt in (
        lambda: read_all(store, uri),
        lambda: store.stat(uri),
        lambda: store.exists(uri),
        lambda: store.delete(uri),
    ):
        with pytest.raises(InvalidArgument) as raised:
            await attempt()
        assert raised.value.violations[0].field == "uri"


@pytest.mark.parametrize(
    "uri",
    [
        "http://example.com/a",
        "ftp://x/y",
        "not a uri",
        "file:///somewhere/else/sha256/ab",
        "s3://other-bucket/team/artifacts/x",
    ],
)
async def test_uris_of_other_schemes_or_roots_are_refused(store: ArtifactStore, uri: str):
    with pytest.raises(InvalidArgument) as raised:
        await store.stat(uri)
    assert raised.value.violations[0].field == "uri"


async def test_a_uri_sharing_only_a_name_prefix_with_the_root_is_outside(store: ArtifactStore):
    with pytest.raises(InvalidArgument) as raised:
        await store.exists(store.root_uri + "-evil/x")
    assert "outside" in raised.value.message


# -- backend specifics ------------------------------------------------------------------


async def test_local_refuses_a_link_that_leads_outside_the_root(tmp_path: Path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0")
    store = LocalArtifactStore((tmp_path / "artifacts").as_uri())
    (store.directory / "reports").symlink_to(outside)

    with pytest.raises(InvalidArgument) as raised:
        await read_all(store, f"{store.root_uri}/reports/passwd")
    assert "outside" in raised.value.message
    with pytest.raises(InvalidArgument):
        await store.put_named("reports/passwd", stream_of([b"overwritten"]))
    assert (outside / "passwd").read_text() == "root:x:0:0"


def test_local_removes_stale_temporary_files_when_it_opens(tmp_path: Path):
    root = tmp_path / "artifacts"
    LocalArtifactStore(root.as_uri())
    temp_dir = tmp_path / ".artifacts.tmp"
    stale, fresh = temp_dir / "upload-dead", temp_dir / "upload-live"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    LocalArtifactStore(root.as_uri(), stale_after_s=3600)

    assert sorted(p.name for p in temp_dir.iterdir()) == ["upload-live"]


async def test_local_content_files_are_read_only(tmp_path: Path):
    store = LocalArtifactStore((tmp_path / "artifacts").as_uri())
    stored = await store.put_bytes(b"immutable")

    mode = (store.directory / content_key(stored.sha256)).stat().st_mode & 0o777
    assert mode == 0o444


async def test_s3_cleans_stale_multipart_uploads(s3_bucket, s3_settings, s3_client):
    store = S3ArtifactStore(f"s3://{s3_bucket}/root", s3_settings, stale_after_s=0)
    s3_client.create_multipart_upload(Bucket=s3_bucket, Key="root/.staging/orphan")
    s3_client.put_object(Bucket=s3_bucket, Key="root/.staging/left", Body=b"x")
    s3_client.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/upload")
    await asyncio.sleep(0.01)

    assert await store.clean_stale_uploads() == 2

    remaining = s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["Key"] for u in remaining] == ["elsewhere/upload"]
    assert "Contents" not in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="root/")


async def test_s3_copies_huge_staged_uploads_in_parts(s3_bucket, s3_settings, s3_client):
    store = S3ArtifactStore(f"s3://{s3_bucket}/root", s3_settings)
    # Lower the single-copy limit (5 GiB) so the multipart copy runs on 12 MiB.
    store.max_copy_object_size = 6 * MiB
    store.copy_part_size = 5 * MiB
    data = pattern(12 * MiB + 1, seed=15)

    stored = await store.put_stream(stream_of(split(data, (MiB,))))

    assert await read_all(store, stored.uri) == data
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == [f"root/{content_key(sha(data))}"]


async def test_s3_grows_the_part_size_for_a_known_huge_size(s3_settings):
    store = S3ArtifactStore("s3://bucket/x", s3_settings)
    assert store._part_size_for(None) == 5 * MiB
    assert store._part_size_for(10 * 1024 * MiB) == 5 * MiB
    assert store._part_size_for(100 * 1024 * MiB) == 11 * MiB


def test_open_artifact_store_picks_the_backend(tmp_path: Path, s3_settings):
    local = open_artifact_store((tmp_path / "a").as_uri(), s3_settings)
    remote = open_artifact_store("s3://bucket/prefix/", s3_settings)

    assert isinstance(local, LocalArtifactStore)
    assert isinstance(remote, S3ArtifactStore)
    assert remote.root_uri == "s3://bucket/prefix"
    with pytest.raises(InvalidArgument) as raised:
        open_artifact_store("gs://bucket/x", s3_settings)
    assert raised.value.violations[0].field == "artifact_root"


async def test_an_early_closed_read_releases_its_stream(store: ArtifactStore):
    stored = await store.put_bytes(pattern(3 * MiB, seed=16))
    stream = store.open_stream(stored.uri, chunk_size=MiB)

    async with contextlib.aclosing(stream):
        first = await anext(stream)

    assert len(first) == MiB
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
