"""Dependency check (plain Python) and installation inside Slicer (after asking the user).

PyTorch is installed through the PyTorch extension's ``PyTorchUtils`` (it picks the wheel matching the
NVIDIA driver) when that extension is present, else with pip.  The other engine requirements come
from ``Resources/requirements.txt``: ``slicer.pydeps.pip_ensure`` (recent Slicer, asks and detects
restarts) when available, else ``slicer.util.pip_install`` after a confirmation dialog.  Nothing is
imported from torch here: checks use package metadata only.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Callable, Optional

from .i18n import _

MINIMUM_TORCH = "2.1"
REQUESTER = "LSNet Segmentation"


class DependencyError(RuntimeError):
    """Dependencies are missing and could not (or may not) be installed; the message says what to do."""

    def __init__(self, message: str, restart_required: bool = False):
        super().__init__(message)
        self.restart_required = restart_required


# --- plain checks ------------------------------------------------------------------------------------
def read_requirements(path) -> list[str]:
    """Requirement strings of a requirements.txt (comments, blanks and pip options skipped)."""
    reqs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            reqs.append(line)
    return reqs


def missing_requirements(requirements: list[str],
                         version_of: Callable[[str], str] = importlib.metadata.version) -> list[str]:
    """The requirement strings not satisfied by the installed distributions."""
    from packaging.requirements import Requirement

    missing = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = version_of(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            missing.append(text)
    return missing


def torch_version() -> Optional[str]:
    """Installed torch version from metadata (torch itself is not imported), or None."""
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_is_recent_enough(version: Optional[str], minimum: str = MINIMUM_TORCH) -> bool:
    if version is None:
        return False
    from packaging.version import Version

    return Version(version.split("+")[0]) >= Version(minimum)


# --- Slicer side (imports slicer lazily) -----------------------------------------------------------------
def ensure_torch(ask: bool = True) -> None:
    """Make ``import torch`` work in Slicer, asking before installing. Raises DependencyError."""
    import slicer

    version = torch_version()
    if torch_is_recent_enough(version):
        return
    try:
        import PyTorchUtils  # provided by the PyTorch extension (EXTENSION_DEPENDS)
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if version is not None:
            raise DependencyError(
                _("PyTorch {version} is installed but LSNet needs {minimum} or newer. Open the 'PyTorch Util' "
                  "module, uninstall PyTorch, restart Slicer and press Segment again.").format(
                    version=version, minimum=MINIMUM_TORCH))
        torch = torchLogic.installTorch(askConfirmation=ask, torchVersionRequirement=f">={MINIMUM_TORCH}")
        if torch is None:
            raise DependencyError(_("PyTorch is required. Install it from the 'PyTorch Util' module or press "
                                    "Segment again and accept the installation."))
        return
    if ask and not slicer.util.confirmOkCancelDisplay(
            _("LSNet needs PyTorch, which is not installed. Install it now with pip (CPU or the default CUDA "
              "build; for a specific GPU install the PyTorch extension from the Extensions Manager instead)? "
              "This can take several minutes."),
            _("Install PyTorch")):
        raise DependencyError(_("PyTorch is required. Installation was cancelled."))
    slicer.util.pip_install(f"torch>={MINIMUM_TORCH}")


def ensure_requirements(requirements_path, ask: bool = True) -> None:
    """Install the engine's other requirements (never torch) if missing. Raises DependencyError."""
    import slicer

    requirements = read_requirements(requirements_path)
    missing = missing_requirements(requirements)
    if not missing:
        return
    pydeps = getattr(slicer, "pydeps", None)
    if pydeps is not None and hasattr(pydeps, "pip_ensure"):
        try:
            pydeps.pip_ensure(pydeps.load_requirements(requirements_path), prompt_install=ask, requester=REQUESTER)
        except RuntimeError as exc:  # raised when the user declines
            raise DependencyError(str(exc)) from exc
        return
    if ask and not slicer.util.confirmOkCancelDisplay(
            _("LSNet needs these Python packages: {packages}. Install them now?").format(packages=", ".join(missing)),
            _("Install dependencies")):
        raise DependencyError(_("Missing Python packages: {packages}.").format(packages=", ".join(missing)))
    slicer.util.pip_install(list(missing))  # a list keeps each specifier one argument
    still = missing_requirements(requirements)
    if still:
        raise DependencyError(_("Packages installed but not importable yet: {packages}. Restart Slicer.").format(
            packages=", ".join(still)), restart_required=True)


def ensure_all(requirements_path, ask: bool = True) -> None:
    ensure_torch(ask)
    ensure_requirements(requirements_path, ask)
