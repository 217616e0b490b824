"""Translation function usable from plain-Python helpers.

Inside Slicer ``_`` is ``slicer.i18n.tr`` (strings are picked up by Slicer's translation tooling);
outside Slicer (CI, the command line) it returns the text unchanged.
"""

try:  # pragma: no cover - exercised inside Slicer only
    from slicer.i18n import tr as _  # noqa: F401
except ImportError:  # plain Python

    def _(text: str) -> str:
        return text
