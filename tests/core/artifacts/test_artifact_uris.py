"""Parsing of artifact store roots and checking of keys, without any storage."""

from __future__ import annotations

import os.path
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aimass.core.artifacts.uris import (
    content_key,
    key_of,
    parse_root_uri,
    sha256_of_key,
    validate_key,
    validate_named_key,
)
from aimass.core.errors import InvalidArgument

DIGEST = "ab" * 32


def test_file_roots_are_canonical(tmp_path: Path):
    spaced = tmp_path / "my artifacts"

    root = parse_root_uri(spaced.as_uri() + "/")

    assert root.scheme == "file"
    assert root.path == spaced
    assert root.uri == spaced.as_uri()
    assert parse_root_uri("file://localhost/srv/a").uri == "file:///srv/a"


def test_s3_roots_split_bucket_and_prefix():
    root = parse_root_uri("s3://models-bucket/teams/vision/")

    assert (root.bucket, root.prefix, root.uri) == (
        "models-bucket",
        "teams/vision",
        "s3://models-bucket/teams/vision",
    )
    assert parse_root_uri("s3://models-bucket").prefix == ""


@pytest.mark.parametrize(
    ("root", "problem"),
    [
        ("gs://bucket/x", "not supported"),
        ("bucket/x", "not a URI"),
        ("", "non-empty"),
        ("file://otherhost/srv/a", "host"),
        ("file:///", "absolute folder"),
        ("file:///srv/../etc", "'..'"),
        ("s3://Bad_Bucket/x", "bucket"),
        ("s3://ab/x", "bucket"),
        ("s3://bucket/a/../b", "segments"),
        ("s3://bucket/a?x=1", "query"),
    ],
)
def test_bad_roots_are_refused_naming_the_setting(root: str, problem: str):
    with pytest.raises(InvalidArgument) as raised:
        parse_root_uri(root)
    assert raised.value.violations[0].field == "artifact_root"
    assert problem in raised.value.message


def test_content_keys_fan_out_by_the_first_four_hex_digits():
    assert content_key(DIGEST) == f"sha256/ab/ab/{DIGEST}"
    assert sha256_of_key(content_key(DIGEST)) == DIGEST
    assert sha256_of_key("reports/x.html") is None
    with pytest.raises(InvalidArgument):
        content_key("AB" * 32)


@pytest.mark.parametrize(
    "key",
    [f"sha256/ab/cd/{DIGEST}", f"sha256/ab/{DIGEST}", "sha256/ab/ab/short", f"sha256/{DIGEST}"],
)
def test_malformed_content_addresses_are_refused(key: str):
    with pytest.raises(InvalidArgument):
        sha256_of_key(key)


def test_key_of_strips_the_root_and_refuses_lookalike_roots():
    root = parse_root_uri("s3://bucket/prefix")

    assert key_of(root, "s3://bucket/prefix/a/b.txt") == "a/b.txt"
    for uri in ("s3://bucket/prefix2/a", "s3://bucket/a", "file:///prefix/a", "s3://bucket/prefix"):
        with pytest.raises(InvalidArgument) as raised:
            key_of(root, uri)
        assert raised.value.violations[0].field == "uri"


def test_named_keys_keep_out_of_reserved_namespaces():
    assert validate_named_key("releases/m/v3/bundle.tar.gz") == "releases/m/v3/bundle.tar.gz"
    for key in ("sha256/x", ".staging/x", ".hidden"):
        with pytest.raises(InvalidArgument) as raised:
            validate_named_key(key)
        assert raised.value.violations[0].field == "relative_key"
    assert validate_named_key("a/.hidden/b") == "a/.hidden/b"


@given(st.text(max_size=40))
def test_an_accepted_key_never_resolves_outside_the_root(key: str):
    root = "/srv/artifacts"
    try:
        validate_key(key)
    except InvalidArgument:
        return
    joined = os.path.normpath(os.path.join(root, key))
    assert joined.startswith(root + "/")
    assert joined == f"{root}/{key}"


@given(st.lists(st.sampled_from(["..", ".", "", "%2e%2e", "a\\b", "/", "\x00", "ok"]), min_size=1))
def test_keys_with_traversal_parts_are_refused(segments: list[str]):
    key = "/".join(segments)
    if all(segment == "ok" for segment in segments):
        assert validate_key(key) == key
    else:
        with pytest.raises(InvalidArgument):
            validate_key(key)
