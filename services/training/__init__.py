"""aimass training service."""
