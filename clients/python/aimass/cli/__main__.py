"""``python -m aimass.cli``: the same as the ``aimass`` command."""

from aimass.cli.main import app

app()
