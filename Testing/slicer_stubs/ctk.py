"""Stub of ``ctk`` (nothing is used at import time)."""
