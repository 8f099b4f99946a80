"""Alembic migrations of the aimass metadata store."""
