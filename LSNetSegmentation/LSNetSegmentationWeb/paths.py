"""File access for the web app: only under ``--data-root`` (plain Python, no Slicer, no trame).

Every path the page sends is relative to the data root.  :meth:`DataRoot.resolve` resolves it
(symlinks included, with ``Path.resolve(strict=True)``) and refuses it unless the result is inside
the resolved data root, so ``..``, absolute paths elsewhere and symlinks that lead out are all
refused with one clear line (:class:`AccessError`, a ``lsnet.errors.InputError``, the CLI's kind of
user error).  Uploads are checked against a size limit before they are written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from lsnet.errors import InputError

IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


class AccessError(InputError):
    """A path outside the data root, or an upload that is too large or badly named."""


def has_image_suffix(name: str) -> bool:
    low = name.lower()
    return any(low.endswith(s) for s in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the data root, '/'-separated
    kind: str  # "image" or "dicom"


class DataRoot:
    """The folder whose files (and only those) the web page may open."""

    def __init__(self, root) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise InputError(f"--data-root {root} is not a folder")
        self.root = root.resolve(strict=True)

    def resolve(self, relative: str) -> Path:
        """Absolute path of ``relative`` (a file or folder under the data root), checked."""
        text = str(relative or "").strip()
        if not text:
            raise AccessError("No file given: choose a CT file or DICOM folder under the data root.")
        if "\x00" in text:
            raise AccessError("Refused: the path contains a NUL character.")
        candidate = Path(text)
        if candidate.is_absolute() or ".." in candidate.parts:
            raise AccessError(f"Refused: {text} is outside the data root (give a path inside it, without '..').")
        joined = self.root / candidate
        try:
            resolved = joined.resolve(strict=True)
        except FileNotFoundError:
            raise AccessError(f"{text} does not exist under the data root.") from None
        except (OSError, RuntimeError) as exc:  # symlink loops, permission
            raise AccessError(f"Refused: {text} cannot be resolved ({exc}).") from None
        if not resolved.is_relative_to(self.root):
            raise AccessError(f"Refused: {text} leads outside the data root (a symbolic link out of it).")
        return resolved

    def entries(self, limit: int = 500) -> list[Entry]:
        """Image files and DICOM folders under the root (links out of the root are left out)."""
        found: list[Entry] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            here = Path(dirpath)
            if not here.resolve().is_relative_to(self.root):
                continue
            rel_dir = here.relative_to(self.root)
            dicom = [f for f in filenames if f.lower().endswith(".dcm")]
            if dicom and str(rel_dir) != ".":
                found.append(Entry(rel_dir.as_posix(), "dicom"))
            for name in sorted(filenames):
                if has_image_suffix(name) and not name.lower().endswith(".seg.nrrd") and "_label" not in name:
                    p = here / name
                    if p.resolve().is_relative_to(self.root):
                        found.append(Entry((rel_dir / name).as_posix(), "image"))
            if len(found) >= limit:
                break
        return found[:limit]


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def upload_name(name: str) -> str:
    """A safe file name for an uploaded image (no folders, an image suffix)."""
    base = Path(str(name or "")).name
    if not has_image_suffix(base):
        raise AccessError(f"Upload refused: {base or 'the file'} is not an image file "
                          f"({', '.join(IMAGE_SUFFIXES)}); for DICOM put the series folder under the data root.")
    return _SAFE_NAME.sub("_", base)


def check_upload_size(size: int, limit_bytes: int) -> None:
    if size > limit_bytes:
        raise AccessError(f"Upload refused: {size / 1e6:.1f} MB is over the limit of {limit_bytes / 1e6:.0f} MB "
                          "(start lsnet web with a larger --upload-limit-mb, or put the file under the data root).")
