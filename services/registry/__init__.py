"""aimass registry service."""
