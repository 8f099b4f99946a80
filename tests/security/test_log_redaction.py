"""The log formatter masks each kind of aimass secret even where no key name precedes it.

test_secrets_not_leaked.py shows that no code path of the flow logs a secret; this is
the net under it: a secret that does reach a log call is masked by the formatter.
"""

from __future__ import annotations

import logging

import pytest

from aimass.core.logging import JsonFormatter

API_KEY = "aimass_ci-bot_Zx9sd8f7g6h5j4k3l2Qw"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJzb21lb25lIn0.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"
DB_PASSWORD = "db-pass-Hq8wE2rT"


@pytest.mark.parametrize(
    ("message", "secret"),
    [
        (f"refused key {API_KEY} for ListDatasets", API_KEY.rsplit("_", 1)[-1]),
        (f"caller sent {JWT}", JWT.rsplit(".", 1)[-1]),
        (f"connecting to postgresql+psycopg://aimass:{DB_PASSWORD}@db:5432/aimass", DB_PASSWORD),
        ("webhook hooks/a secret=whsec-Pz0xY9wV8u", "whsec-Pz0xY9wV8u"),
        (f"authorization: Bearer {JWT}", JWT.rsplit(".", 1)[-1]),
    ],
)
def test_a_secret_in_a_message_or_an_extra_field_is_masked(message, secret):
    formatter = JsonFormatter("security-test")
    record = logging.LogRecord("aimass.test", logging.INFO, __file__, 1, message, None, None)
    record.detail = message  # extra= fields go through the same masking
    line = formatter.format(record)
    assert secret not in line, line


def test_ordinary_text_is_left_alone():
    formatter = JsonFormatter("security-test")
    text = "trained 3 epochs on datasets/digits, artifacts at s3://bucket/a and https://x.io/y"
    record = logging.LogRecord("aimass.test", logging.INFO, __file__, 1, text, None, None)
    assert text in formatter.format(record)
