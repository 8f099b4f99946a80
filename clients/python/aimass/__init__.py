"""aimass: the Python SDK and CLI."""
