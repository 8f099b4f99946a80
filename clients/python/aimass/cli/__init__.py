"""The aimass command line."""
