"""Weights: safetensors tensors + a JSON model card.  Data only — nothing is ever unpickled.

A model is two files side by side::

    lsnet_pancreas.safetensors   the tensors (fp16 or fp32)
    lsnet_pancreas.json          the model card

The card (``CARD_SCHEMA``) holds the architecture config (``config.ModelConfig``), preprocessing,
labels, training data, metrics, and the sha256 of the .safetensors file.  The card is also embedded in
the safetensors header metadata (key ``lsnet_card``) so a lone .safetensors file still loads; when the
side-car exists it wins and must match the file's sha256.

``read_model_card`` needs no torch (the Slicer module shows the card before PyTorch is installed).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from lsnet.errors import WeightsError

CARD_FORMAT = "lsnet-model-card/1"
DEFAULT_WEIGHTS_NAME = "lsnet_pancreas.safetensors"
_REQUIRED_CARD_KEYS = ("format", "name", "config")


def default_weights_path() -> Path:
    """The bundled model: ``$LSNET_WEIGHTS`` if set, else ``Resources/Models/lsnet_pancreas.safetensors``
    of the Slicer module folder the engine lives in."""
    env = os.environ.get("LSNET_WEIGHTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "Resources" / "Models" / DEFAULT_WEIGHTS_NAME


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path_for(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def _sniff(path: Path) -> None:
    """Refuse pickles / zip checkpoints / non-safetensors files before any parser sees them.

    A safetensors file starts with an 8-byte little-endian header length followed by ``{``; that is
    checked first (its first byte can be anything, 0x80 included), then the pickle/zip signatures.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= min(size - 8, 100_000_000) and head[8:9] == b"{":
            return
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise WeightsError(
            f"{path} is a pickled PyTorch checkpoint (.pt/.pth). LSNet never unpickles files because they "
            "can run code. Export the model with `python -m training.export CHECKPOINT -o model.safetensors` "
            "on a machine you trust, then load the .safetensors file."
        )
    if len(head) < 9:
        raise WeightsError(f"{path} is too short to be a safetensors file ({len(head)} bytes): the file is truncated or empty.")
    raise WeightsError(
        f"{path} is not a safetensors file (bad header). Choose an LSNet weights file (.safetensors with its .json model card)."
    )


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: the safetensors header is corrupt ({e}).") from e


def read_model_card(path: Optional[os.PathLike] = None) -> dict[str, Any]:
    """The model card of a weights file (side-car JSON, else the embedded one). No torch needed."""
    path = Path(path) if path is not None else default_weights_path()
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if not path.exists():
        hint = (
            " The bundled model is missing from this installation: reinstall the extension, or pass --weights."
            if path == default_weights_path()
            else ""
        )
        raise WeightsError(f"Weights file not found: {path}.{hint}")
    _sniff(path)
    side = card_path_for(path)
    if side.exists():
        try:
            card = json.loads(side.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"The model card {side} is not valid JSON ({e}).") from e
    else:
        meta = _header(path).get("__metadata__") or {}
        if "lsnet_card" not in meta:
            raise WeightsError(
                f"{path} is a safetensors file but not an LSNet model (no model card in the file and no {side.name} "
                "next to it). Use weights exported by training/export.py."
            )
        card = json.loads(meta["lsnet_card"])
    missing = [k for k in _REQUIRED_CARD_KEYS if k not in card]
    if missing or card.get("format") != CARD_FORMAT:
        raise WeightsError(
            f"The model card of {path} is not an LSNet card (format {card.get('format')!r}, missing {missing}); "
            f"expected format {CARD_FORMAT!r}."
        )
    return card


def verify_checksum(path: Path, card: dict[str, Any]) -> None:
    expected = card.get("sha256")
    if expected and sha256_of(path) != expected:
        raise WeightsError(
            f"{path} does not match its model card (sha256 differs): the file is corrupt, truncated or was replaced. "
            "Download/export it again."
        )


def save_model(model, path: os.PathLike, card: Optional[dict[str, Any]] = None, dtype: str = "float16") -> Path:
    """Write ``model`` (an ``LSNet``-like module with ``.config``) as safetensors + card; returns the weights path.

    ``dtype``: ``float16`` (default, half the size; BatchNorm running stats are kept in fp32) or ``float32``.
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if dtype == "float16" and v.is_floating_point() and "running_" not in k:
            v = v.half()
        tensors[k] = v
    card = dict(card or {})
    card.setdefault("name", path.stem)
    card["format"] = CARD_FORMAT
    card["config"] = model.config.to_dict()
    card["tensor_dtype"] = dtype
    card.pop("sha256", None)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"lsnet_card": json.dumps(card)})
    os.replace(tmp, path)
    path.chmod(0o644)  # a model file is data to share, not a private temp file
    card["sha256"] = sha256_of(path)
    tmpj = card_path_for(path).with_name(card_path_for(path).name + ".tmp")
    tmpj.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    os.replace(tmpj, card_path_for(path))
    _ = torch  # torch imported for save_file's tensors
    return path


def checked_card(path: Optional[os.PathLike] = None) -> tuple[dict, Path]:
    """The model card of a weights file (default: the bundled model) after the file's checks;
    ``(card, path of the .safetensors file)``.

    Raises :class:`WeightsError` with a clear message for a missing, pickled or foreign file, or a
    checksum that does not match the card.  Which network the card describes is not this module's
    business: ``lsnet.architectures.load_model`` builds it, then calls :func:`read_tensors` and
    :func:`load_state_checked`.
    """
    path = Path(path) if path is not None else default_weights_path()
    card = read_model_card(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    verify_checksum(path, card)
    return card, path


def read_tensors(path: Path) -> dict:
    """The tensors of a checked ``.safetensors`` file, by name, on the CPU (``WeightsError`` if truncated)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path} cannot be read as safetensors ({e}); the file is probably truncated. Export it again.") from e


def load_state_checked(model, tensors: dict, path: Path, architecture: str) -> None:
    """Copy ``tensors`` into ``model`` (an ``nn.Module``) after checking names and shapes.

    A missing, unexpected or wrongly shaped tensor raises :class:`WeightsError` naming up to five of each.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if tuple(own[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        def few(xs):
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")

        raise WeightsError(
            f"{path} does not match the architecture in its model card ({architecture}): "
            + "; ".join(
                s
                for s in (
                    f"missing tensors: {few(missing)}" if missing else "",
                    f"unexpected tensors: {few(unexpected)}" if unexpected else "",
                    f"wrong shapes: {few(wrong)}" if wrong else "",
                )
                if s
            )
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
