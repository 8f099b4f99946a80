"""aimass compression service."""
