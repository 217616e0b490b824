"""Stub of ``vtk`` (nothing is used at import time)."""
