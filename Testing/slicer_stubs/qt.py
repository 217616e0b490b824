"""Stub of PythonQt's ``qt`` module (nothing is used at import time)."""
