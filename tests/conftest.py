"""Fixtures shared by the whole suite live in tests/fixtures, one module per real component."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.nats",
    "tests.fixtures.s3",
    "tests.fixtures.tracing",
]
