"""aimass routing service."""
