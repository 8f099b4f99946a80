"""aimass evaluation service."""
