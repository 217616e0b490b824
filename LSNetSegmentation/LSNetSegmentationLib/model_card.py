"""Find and describe model weights for the GUI (plain Python, no torch).

The card is the JSON written next to each ``.safetensors`` file; ``lsnet.io.weights.read_model_card``
reads it without PyTorch.  This module only decides which file to describe and formats the card.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Optional

from .i18n import _
from .parameters import ModelSource


def bundled_weights_path() -> Optional[Path]:
    """The engine's default weights file, or None if the engine cannot tell (e.g. not trained yet)."""
    try:
        from lsnet.io.weights import default_weights_path
    except ImportError:
        return None
    try:
        return Path(default_weights_path())
    except Exception:  # noqa: BLE001 - the card is informative only; Segment reports real errors
        return None


def selected_weights_path(source: ModelSource, custom_path) -> Optional[Path]:
    if source == ModelSource.BUNDLED:
        return bundled_weights_path()
    if custom_path and str(custom_path) not in ("", "."):
        return Path(custom_path)
    return None


def read_card(weights_path: Optional[Path]) -> Optional[dict]:
    if weights_path is None:
        return None
    try:
        from lsnet.io.weights import read_model_card

        return dict(read_model_card(weights_path))
    except Exception:  # noqa: BLE001 - shown as "no card" in the GUI
        return None


_CARD_FIELDS = (
    ("name", _("Model")),
    ("version", _("Version")),
    ("description", _("Description")),
    ("training_data", _("Trained on")),
    ("metrics", _("Validation")),
    ("intended_use", _("Intended use")),
    ("license", _("License")),
)


def _text(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_card(card: Optional[dict], weights_path: Optional[Path]) -> str:
    """Rich text (Qt subset of HTML) for the model card label."""
    if weights_path is None:
        return _("<i>No weights selected.</i>")
    if not card:
        return _("<i>No model card found next to {name}.</i>").format(name=html.escape(Path(weights_path).name))
    lines = []
    for key, title in _CARD_FIELDS:
        if key in card and card[key] not in (None, "", [], {}):
            lines.append(f"<b>{html.escape(title)}:</b> {html.escape(_text(card[key]))}")
    if not lines:
        lines.append(html.escape(", ".join(sorted(card))))
    lines.append(f"<small>{html.escape(str(weights_path))}</small>")
    return "<br>".join(lines)
