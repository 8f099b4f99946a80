"""aimass core service."""
