"""User-facing errors of the engine.

Every failure a user can cause (bad file, bad weights, no GPU, ...) is raised as a subclass of
:class:`LSNetError` whose message says what is wrong *and what to do about it*.  Front ends (the CLI,
the Slicer module) catch :class:`LSNetError` and show the message without a traceback; anything else
is a bug.
"""

from __future__ import annotations


class LSNetError(Exception):
    """Base class of all errors meant to be shown to a user as they are."""


class InputError(LSNetError):
    """The input image cannot be used (missing, not an image, wrong dimensionality, empty, NaN...)."""


class WeightsError(LSNetError):
    """A weights file or its model card is missing, corrupt, foreign or does not match the architecture."""


class DeviceError(LSNetError):
    """The requested compute device is not available (e.g. ``--device cuda`` without a GPU)."""


class OutputError(LSNetError):
    """Output cannot be written (exists and ``overwrite`` is off, folder not writable...)."""


class CancelledError(LSNetError):
    """The run was cancelled by the user; nothing was written."""
