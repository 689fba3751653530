"""Bundled demo dashboard backend (SPEC §10)."""
