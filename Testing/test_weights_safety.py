"""A weights file is data only: every unsafe, broken or foreign file is refused with a clear WeightsError.

None of these files may execute code: pickles whose ``__reduce__`` would create a marker file are
offered under several names, and ``torch.load`` / ``pickle.load(s)`` are replaced by tripwires for the
whole module, so that a loader that unpickled anything would fail the test even if it then errored.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from lsnet.config import ModelConfig
from lsnet.errors import WeightsError
from lsnet.method.model import LSNet
from lsnet.architectures import load_model
from lsnet.io.weights import card_path_for, read_model_card, save_model

TINY = dict(width=8, roi_size=64, spacing=2.0)


class _Payload:
    """Unpickling this creates ``marker`` (os.system would be the real-world attack)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(autouse=True)
def tripwires(monkeypatch):
    """Any unpickling during these tests is a failure, whatever the loader does afterwards."""
    calls = []

    def trip(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} was called: weights must never be unpickled")

        return f

    monkeypatch.setattr(torch, "load", trip("torch.load"))
    monkeypatch.setattr(pickle, "load", trip("pickle.load"))
    monkeypatch.setattr(pickle, "loads", trip("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", trip("pickle.Unpickler"))
    yield calls
    assert not calls, calls


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    return save_model(LSNet(ModelConfig(**TINY)), path, {"name": "tiny-random"})


def _copy(src: Path, dst_dir: Path, name: str = "m.safetensors", card: bool = True) -> Path:
    dst = dst_dir / name
    shutil.copyfile(src, dst)
    if card:
        shutil.copyfile(card_path_for(src), card_path_for(dst))
    return dst


def _refused(path: Path, *words: str) -> str:
    with pytest.raises(WeightsError) as ei:
        load_model(path)
    msg = str(ei.value)
    assert path.stem in msg  # the message names the file (weights or its card)
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


def test_good_file_loads(good):
    model, card = load_model(good)
    assert card["name"] == "tiny-random" and model.config.width == 8


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("name", ["evil.safetensors", "evil.pth", "evil.pt"])
def test_pickle_is_refused_and_never_executed(tmp_path, protocol, name):
    marker = tmp_path / "PWNED"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}, protocol=protocol))
    with pytest.raises(WeightsError) as ei:
        load_model(path)
    assert "pickle" in str(ei.value).lower() or "not a safetensors" in str(ei.value).lower()
    assert not marker.exists()
    with pytest.raises(WeightsError):
        read_model_card(path)
    assert not marker.exists()


def test_pth_zip_checkpoint_is_refused(tmp_path, good):
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.pth"
    # torch.save is only used to *make* the file (with the real pickle module, tripwires are on load only)
    torch.save({"model": LSNet(ModelConfig(**TINY)).state_dict(), "evil": _Payload(marker)}, path)
    assert path.read_bytes()[:2] == b"PK"
    msg = _refused(path, "pickle", "safetensors")
    assert "never unpickles" in msg
    assert not marker.exists()


def test_truncated_file_with_card_fails_checksum(tmp_path, good):
    path = _copy(good, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(path, "sha256")


def test_truncated_file_without_card_is_refused(tmp_path, good):
    path = _copy(good, tmp_path, card=False)  # the card embedded in the header is used
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    _refused(path, "truncated")


@pytest.mark.parametrize("keep", [0, 5, 8, 40])
def test_header_cut_short_is_refused(tmp_path, good, keep):
    path = _copy(good, tmp_path, card=False)
    path.write_bytes(path.read_bytes()[:keep])
    _refused(path)


def test_foreign_safetensors_without_card_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other_model.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.ones(3)}, str(path))
    _refused(path, "not an lsnet model")


def test_foreign_safetensors_with_foreign_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "hf.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    _refused(path, "not an lsnet model")


def test_card_for_unknown_architecture_is_refused(tmp_path, good):
    path = _copy(good, tmp_path)
    card = json.loads(card_path_for(path).read_text())
    card["config"]["architecture"] = "nnunet"
    card.pop("sha256")
    card_path_for(path).write_text(json.dumps(card))
    _refused(path, "architecture")


def test_card_for_other_width_does_not_match_tensors(tmp_path, good):
    path = _copy(good, tmp_path)
    card = json.loads(card_path_for(path).read_text())
    card["config"]["width"] = 16  # a card of another variant next to these tensors
    card_path_for(path).write_text(json.dumps(card))
    _refused(path, "does not match the architecture", "wrong shapes")


def test_wider_snet_round_trips_and_a_card_without_its_width_is_refused(tmp_path):
    torch.manual_seed(0)
    path = save_model(LSNet(ModelConfig(**{**TINY, "snet_width": 16})), tmp_path / "wide.safetensors", {"name": "wide"})
    model, _ = load_model(path)
    assert model.snet.encoder.conv1.out_channels == 16 and model.lnet.encoder.conv1.out_channels == TINY["width"]
    card = json.loads(card_path_for(path).read_text())
    card["config"]["snet_width"] = 0  # a card that forgets S-Net's own width
    card.pop("sha256")
    card_path_for(path).write_text(json.dumps(card))
    _refused(path, "does not match the architecture")


def test_card_with_wrong_sha256_is_refused(tmp_path, good):
    path = _copy(good, tmp_path)
    card = json.loads(card_path_for(path).read_text())
    card["sha256"] = "0" * 64
    card_path_for(path).write_text(json.dumps(card))
    _refused(path, "sha256")


def test_file_replaced_after_card_was_written_is_refused(tmp_path, good):
    path = _copy(good, tmp_path)
    torch.manual_seed(1)
    other = save_model(LSNet(ModelConfig(**TINY)), tmp_path / "other.safetensors", {"name": "other"})
    shutil.copyfile(other, path)  # same architecture, other tensors: only the checksum can tell
    _refused(path, "sha256")


@pytest.mark.parametrize(
    "card_text,words",
    [("{not json", ["not valid json"]), (json.dumps({"format": "something/else", "name": "x", "config": {}}), ["not an lsnet card"]),
     (json.dumps({"format": "lsnet-model-card/1", "name": "x", "config": {"no_such_key": 1}}), ["invalid config"])],
)
def test_broken_cards_are_refused(tmp_path, good, card_text, words):
    path = _copy(good, tmp_path)
    card_path_for(path).write_text(card_text)
    _refused(path, *words)


def test_missing_file_is_a_weights_error(tmp_path):
    _refused(tmp_path / "nowhere.safetensors", "not found")


def test_cli_reports_bad_weights_in_one_line(tmp_path, capsys, good):
    from lsnet.app.cli import main

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    ct = tmp_path / "ct.nrrd"
    import numpy as np
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.full((1, 32, 32), -1000, np.int16)), str(ct))
    out = tmp_path / "out"
    rc = main(["segment", str(ct), "-o", str(out), "--weights", str(evil), "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and "pickle" in err.lower()
    assert len([ln for ln in err.splitlines() if ln.startswith("lsnet: error")]) == 1
    assert not marker.exists()
    assert not out.exists() or not any(out.iterdir())
    assert os.path.exists(ct)


def test_safetensors_whose_header_length_starts_with_0x80_is_not_mistaken_for_a_pickle(tmp_path):
    """Regression: the first byte of a safetensors file is the low byte of its header length."""
    import json as _json

    from lsnet.io.weights import _sniff

    header = _json.dumps({"__metadata__": {"x": "y"}}).encode()
    header += b" " * ((0x180 - len(header)) % 256 or 256)  # header length = 0x180: first byte 0x80
    assert len(header) & 0xFF == 0x80
    p = tmp_path / "m.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header)
    _sniff(p)  # no WeightsError
