"""The engine's version (base room: imports nothing), written into model cards, DICOM SEG and ``lsnet --version``."""

__version__ = "0.1.0"
