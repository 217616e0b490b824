"""Volume inference: orientation handling, scale policy, 1-slice volumes, user boxes, cancel, weights."""

import json
import threading

import numpy as np
import pytest
import torch

from lsnet.app.cli import main as cli_main
from lsnet.config import ModelConfig
from lsnet.errors import CancelledError, InputError, WeightsError
from lsnet.io.geometry import Reorientation, Volume
from lsnet.pipeline.inference import Segmenter
from lsnet.method.model import LSNet
from lsnet.samples.phantom import make_phantom_volume
from lsnet.pipeline.preprocess import canvas_to_original, slice_grid, to_canvas
from lsnet.results import RoiBox
from lsnet.architectures import load_model
from lsnet.io.weights import read_model_card, save_model


def eager_model(seed=0):
    """A random tiny model whose heatmap fires somewhere (so RR/S-Net/paste-back all run)."""
    torch.manual_seed(seed)
    m = LSNet(ModelConfig(width=8, roi_size=64, spacing=2.0))
    torch.nn.init.constant_(m.lnet.kp_head[-1].bias, 0.3)
    torch.nn.init.constant_(m.snet.head.bias, 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def phantom():
    img, lab = make_phantom_volume(shape=(6, 96, 112), spacing=(2.0, 2.0, 3.0), seed=2)
    return img


# ------------------------------------------------------------------ scale policy (preprocess.py)
@pytest.mark.parametrize("size,spacing", [(64, 3.0), (128, 0.5), (512, 0.8), (1024, 0.5), (333, 1.7), (700, 2.2)])
def test_scale_policy_any_size_and_spacing(size, spacing):
    g = slice_grid((size, size + 7), (spacing, spacing), 1.25, 32)
    assert g.canvas_hw[0] % 32 == 0 and g.canvas_hw[1] % 32 == 0
    assert g.canvas_hw[0] >= g.resized_hw[0] and g.canvas_hw[1] >= g.resized_hw[1]
    # resized pixels are 1.25 mm: the pixel count is the field of view / 1.25 mm, rounded
    assert abs(g.resized_hw[0] - size * spacing / 1.25) <= 0.5
    assert abs(g.resized_hw[1] - (size + 7) * spacing / 1.25) <= 0.5
    boxes = torch.tensor([[3.0, 5.0, 20.5, 33.25]])
    assert torch.allclose(g.to_original_xyxy(g.to_canvas_xyxy(boxes)), boxes)


def test_canvas_round_trip_keeps_geometry():
    h0, w0 = 90, 120
    yy, xx = np.mgrid[0:h0, 0:w0].astype(np.float32)
    ramp = torch.from_numpy(0.3 * xx + 0.1 * yy)[None, None]
    g = slice_grid((h0, w0), (0.7, 0.7), 1.25, 32)  # downsample by 0.56, pad
    canvas = to_canvas(ramp, g)
    assert tuple(canvas.shape[-2:]) == g.canvas_hw
    back = canvas_to_original(canvas, g)
    inner = (slice(None), slice(None), slice(4, h0 - 4), slice(4, w0 - 4))
    assert (back[inner] - ramp[inner]).abs().max() < 0.05  # bilinear on a ramp: exact but for antialias edges


# ------------------------------------------------------------------ orientation equivariance
@pytest.mark.parametrize("perm,flip", [((0, 1, 2), (False, True, True)), ((2, 0, 1), (True, False, False)), ((1, 0, 2), (False, False, True))])
def test_any_orientation_gives_the_same_segmentation(phantom, perm, flip):
    seg = Segmenter(model=eager_model(), device="cpu", batch_size=4)
    ref = seg.segment_volume(phantom)
    assert ref.mask.any() and len(ref.boxes) > 0, "the test model must produce RoIs"
    # Build the same physical image stored in another array order: direction columns permuted/flipped.
    reo = Reorientation(perm, flip, (0, 0, 0))
    inv_perm = np.argsort(perm)
    n_can = phantom.array.shape[::-1]  # canonical (I, J, K)
    n_in = [n_can[inv_perm[a]] for a in range(3)]
    reo = Reorientation(perm, flip, tuple(n_in[::-1]))
    arr_in = np.ascontiguousarray(reo.to_input_array(phantom.array))
    direction = np.zeros((3, 3))
    spacing = [0.0, 0.0, 0.0]
    for a in range(3):
        direction[:, perm[a]] = phantom.direction[:, a] * (-1 if flip[a] else 1)
        spacing[perm[a]] = phantom.spacing[a]
    # origin: LPS of input voxel 0 = canonical voxel mapped through the reorientation
    can0 = reo.input_ijk_to_canonical_ijk(np.zeros(3))
    origin = tuple(phantom.ijk_to_lps()[:3, :3] @ can0 + phantom.ijk_to_lps()[:3, 3])
    vol = Volume(arr_in, tuple(spacing), origin, direction)
    res = seg.segment_volume(vol)
    np.testing.assert_array_equal(res.reorientation.to_canonical_array(res.mask), ref.mask)
    np.testing.assert_allclose(res.reorientation.to_canonical_array(res.heatmap), ref.heatmap, atol=1e-6)
    assert [b.to_dict() for b in res.boxes] == [b.to_dict() for b in ref.boxes]


def test_one_slice_volume_and_2d_slice(phantom):
    seg = Segmenter(model=eager_model(), device="cpu")
    one = Volume(phantom.array[3:4], phantom.spacing, phantom.origin, phantom.direction)
    res = seg.segment_volume(one)
    assert res.mask.shape == (1, 96, 112) and res.heatmap.shape == (1, 96, 112)
    mask, heat, boxes = seg.segment_slice(phantom.array[3], spacing_xy=phantom.spacing[:2])
    np.testing.assert_array_equal(mask, res.mask[0])
    assert all(b.slice_index == 0 for b in boxes)
    with pytest.raises(InputError):
        seg.segment_slice(phantom.array)


def test_segment_box_only_changes_pixels_inside_the_roi(phantom):
    seg = Segmenter(model=eager_model(), device="cpu")
    box = RoiBox(2, 30.0, 40.0, 60.0, 70.0, 1.0, source="user")
    mask, prob = seg.segment_box(phantom, 2, box)
    assert mask.shape == (96, 112) and mask.any()
    m = seg.config.alpha / slice_grid((96, 112), (2.0, 2.0), 2.0).f[0] / 2 + 1
    ys, xs = np.nonzero(prob)
    assert xs.min() >= 30 - m and xs.max() <= 60 + m and ys.min() >= 40 - m and ys.max() <= 70 + m
    with pytest.raises(InputError):
        seg.segment_box(phantom, 99, box)
    with pytest.raises(InputError):
        seg.segment_box(phantom, 1, RoiBox(1, 5, 5, 5, 9, 1.0))


def test_cancel_stops_and_returns_nothing(phantom):
    seg = Segmenter(model=eager_model(), device="cpu", batch_size=2)
    ev = threading.Event()
    with pytest.raises(CancelledError):
        seg.segment_volume(phantom, progress=lambda d, t, i: ev.set(), cancel=ev)


def test_nan_volume_is_refused(phantom):
    arr = phantom.array.astype(np.float32)
    arr[1, 5, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        Segmenter(model=eager_model(), device="cpu").segment_volume(phantom.with_array(arr))


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from lsnet.errors import DeviceError

    with pytest.raises(DeviceError, match="--device cpu"):
        Segmenter(model=eager_model(), device="cuda")


# ------------------------------------------------------------------ weights round trip + CLI info
def test_weights_round_trip_and_info(tmp_path, phantom, capsys):
    model = eager_model(3)
    path = save_model(model, tmp_path / "tiny.safetensors", {"description": "test model", "metrics": {"dsc": 0.0}}, dtype="float32")
    card = read_model_card(path)
    assert card["config"]["width"] == 8 and len(card["sha256"]) == 64
    loaded, card2 = load_model(path)
    a = Segmenter(model=model, device="cpu").segment_volume(phantom)
    b = Segmenter(model=loaded, device="cpu", card=card2).segment_volume(phantom)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert cli_main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "test model" in out
    assert cli_main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == card["sha256"]
    # a flipped byte is caught by the checksum
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="sha256"):
        load_model(path)
    assert cli_main(["info", str(tmp_path / "missing.safetensors")]) == 2


def test_python_api_front_door(tmp_path, phantom):
    """The README's Python example: load_segmenter -> segment -> write_outputs (one code path)."""
    import lsnet

    path = save_model(eager_model(4), tmp_path / "m.safetensors", {"description": "api test"})
    seg = lsnet.load_segmenter(weights=path, device="cpu")
    nrrd = tmp_path / "ct.nrrd"
    import SimpleITK as sitk

    sitk.WriteImage(phantom.to_sitk(), str(nrrd))
    res = seg.segment_file(nrrd)
    assert "read" in res.timings and res.mask.shape == phantom.shape
    written = lsnet.write_outputs(res, tmp_path / "out")
    assert written["seg_nrrd"].exists()
    direct = lsnet.segment_volume(lsnet.read_volume(nrrd), weights=path, device="cpu")
    np.testing.assert_array_equal(direct.mask, res.mask)


def test_heatmap_is_rounded_for_display_and_masks_use_exact_values(phantom):
    """heatmap.nrrd holds L-Net's heatmap rounded to 1/255 (inference.HEATMAP_LEVELS); the mask does not
    depend on that rounding."""
    seg = Segmenter(model=eager_model(), device="cpu", drop_small_components=False)
    res = seg.segment_volume(phantom)
    levels = res.heatmap * 255
    assert np.abs(levels - np.round(levels)).max() < 1e-3 and 0 <= res.heatmap.min() and res.heatmap.max() <= 1
    no_heat = seg.segment_volume(phantom, heatmap=False)
    assert no_heat.heatmap is None and np.array_equal(no_heat.mask, res.mask)
