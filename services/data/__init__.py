"""aimass data service."""
