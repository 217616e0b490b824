"""Data side of training/: loaders (real shared data + synthetic layouts), slice cache, splits,
augmentation, crops and the epoch sampler."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

from lsnet.errors import InputError
from lsnet.samples.phantom import make_phantom
from training.augment import AugmentConfig, augment_batch, random_affine, warp
from training.cache import CacheError, CacheParams, SliceCache
from training.cache import main as cache_main
from training.datasets import (
    cases_from_spec,
    cases_from_specs,
    list_cases,
    msd_cases,
    phantom_cases,
    select_labels,
    slices2d_cases,
    tcia_cases,
)
from training.slices import EpochSampler, SliceDataset
from training.splits import patient_folds, split_cases

sitk = pytest.importorskip("SimpleITK")

SMALL = CacheParams(window=(0.0, 255.0), spacing=2.0, pad_multiple=32)


# ------------------------------------------------------------------------------------------------
# helpers: write synthetic volumes in LPS-rotated orientations
# ------------------------------------------------------------------------------------------------
def _write_volume(path, array_kji, spacing, direction=(1, 0, 0, 0, -1, 0, 0, 0, -1), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(array_kji)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


def _stored_as_lpi(canonical_kji):
    """Array to store under direction diag(1, -1, -1) so that the canonical view equals ``canonical_kji``."""
    return np.ascontiguousarray(canonical_kji[::-1, ::-1, :])


@pytest.fixture(scope="module")
def phantom_small():
    return make_phantom(shape=(10, 64, 64), spacing=(2.0, 2.0, 3.0), seed=7)


@pytest.fixture()
def msd_root(tmp_path, phantom_small):
    """MSD layout with a multi-label map: 1 = organ, 2 = 'tumour' (part of the organ), 3 = other."""
    root = tmp_path / "Task07_Pancreas"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    lab = phantom_small.label.astype(np.uint8).copy()
    zz, yy, xx = np.nonzero(lab)
    lab[zz[: len(zz) // 4], yy[: len(zz) // 4], xx[: len(zz) // 4]] = 2
    lab[:, :3, :3] = 3
    training = []
    for n in (1, 2):
        _write_volume(root / "imagesTr" / f"pancreas_00{n}.nii.gz", _stored_as_lpi(phantom_small.array), (2.0, 2.0, 3.0))
        _write_volume(root / "labelsTr" / f"pancreas_00{n}.nii.gz", _stored_as_lpi(lab), (2.0, 2.0, 3.0))
        training.append({"image": f"./imagesTr/pancreas_00{n}.nii.gz", "label": f"./labelsTr/pancreas_00{n}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "pancreas", "2": "cancer", "3": "other"},
                                                   "training": training}))
    return root, lab


# ------------------------------------------------------------------------------------------------
# loaders on the real shared data
# ------------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_slices2d_loader_real_data_matches_the_tcia_volume(shared_data):
    cases = slices2d_cases(shared_data / "pancreas-ct-slices")
    assert len(cases) == 210
    assert len({c.patient_id for c in cases}) == 49
    assert all(c.patient_id.startswith("PANCREAS_") for c in cases)
    vol_case = tcia_cases(shared_data / "pancreas-ct")[0]
    assert vol_case.patient_id == "PANCREAS_0001"
    vol = vol_case.load()
    assert vol.image.shape == (240, 512, 512) and vol.spacing == (0.859375, 0.859375, 1.0)
    assert int(vol.label.sum()) == 78329
    ks = np.flatnonzero(vol.label.any((1, 2)))
    assert (ks.min(), ks.max()) == (70, 140)  # source slices 99-169 counted from the top
    bone_rows = np.nonzero(vol.image[105] > 300)[0]
    assert bone_rows.mean() > 256, "canonical: spine in the bottom half"
    # the 2-D slices of patient 0001 are rows-flipped DICOM slices: same pixels as the canonical volume
    own = [c for c in cases if c.patient_id == "PANCREAS_0001"]
    assert len(own) == 3
    for c in own:
        d = c.load()
        assert d.image.shape == (1, 512, 512) and d.spacing[:2] == (0.8, 0.8) and not d.contiguous
        kz = 239 - d.slice_numbers[0]  # raw index counted from the top -> canonical index
        ref = np.clip(vol.image[kz].astype(np.float32), 0, 255)
        assert np.corrcoef(ref.ravel(), d.image[0].ravel())[0, 1] > 0.99
        assert np.array_equal(d.label[0], vol.label[kz])


@pytest.mark.realdata
def test_spec_with_shared_placeholder(shared_data, monkeypatch):
    monkeypatch.setenv("LSNET_SHARED_DATA", str(shared_data))
    cases = cases_from_spec({"type": "slices2d", "root": "{shared}/pancreas-ct-slices"})
    assert len(cases) == 210
    with pytest.raises(InputError):
        cases_from_specs([{"type": "slices2d", "root": "{shared}/pancreas-ct-slices"}] * 2)  # duplicate ids


def test_loaders_fail_with_clear_errors(tmp_path):
    with pytest.raises(InputError, match="images/"):
        slices2d_cases(tmp_path)
    with pytest.raises(InputError, match="PANCREAS_NNNN"):
        tcia_cases(tmp_path)
    with pytest.raises(InputError, match="imagesTr"):
        msd_cases(tmp_path)
    with pytest.raises(InputError, match="unknown"):
        cases_from_spec({"type": "nope"})


# ------------------------------------------------------------------------------------------------
# synthetic layouts: MSD / nnU-Net / list / 2-D
# ------------------------------------------------------------------------------------------------
def test_msd_loader_multilabel_and_canonical(msd_root, phantom_small):
    root, lab = msd_root
    all_fg = msd_cases(root)
    assert [c.case_id for c in all_fg] == ["pancreas_001", "pancreas_002"]
    d = all_fg[0].load()
    assert np.array_equal(d.image, phantom_small.array), "diag(1,-1,-1) storage must come back canonical"
    assert np.array_equal(d.label, (lab > 0).astype(np.uint8))
    organ = msd_cases(root, label_values=[1, 2])[0].load()
    assert np.array_equal(organ.label, np.isin(lab, [1, 2]).astype(np.uint8))
    by_name = msd_cases(root, label_name="Pancreas")[0].load()
    assert np.array_equal(by_name.label, (lab == 1).astype(np.uint8))
    with pytest.raises(InputError, match="liver"):
        msd_cases(root, label_name="liver")


def test_nnunet_v2_layout(tmp_path, phantom_small):
    root = tmp_path / "Dataset001_Pancreas"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    _write_volume(root / "imagesTr" / "case_7_0000.nii.gz", phantom_small.array, (2.0, 2.0, 3.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    _write_volume(root / "labelsTr" / "case_7.nii.gz", phantom_small.label * 4, (2.0, 2.0, 3.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "pancreas": 4}, "file_ending": ".nii.gz"}))
    (c,) = msd_cases(root, label_name="pancreas")
    assert c.case_id == "case_7" and c.patient_id == "case_7"
    d = c.load()
    assert np.array_equal(d.label, phantom_small.label) and np.array_equal(d.image, phantom_small.array)


def test_list_loader_csv_and_json(tmp_path, phantom_small):
    _write_volume(tmp_path / "a.nrrd", phantom_small.array, (2.0, 2.0, 3.0))
    _write_volume(tmp_path / "a_seg.nrrd", phantom_small.label, (2.0, 2.0, 3.0))
    (tmp_path / "cases.csv").write_text("image,label,patient_id\na.nrrd,a_seg.nrrd,P1\n")
    (c,) = list_cases(tmp_path / "cases.csv")
    assert c.patient_id == "P1"
    assert np.array_equal(c.load().label, phantom_small.label[::-1, ::-1])
    (tmp_path / "cases.json").write_text(json.dumps({"cases": [{"image": str(tmp_path / "a.nrrd"), "label": "a_seg.nrrd"}]}))
    (c2,) = list_cases(tmp_path / "cases.json")
    assert c2.patient_id == "a"
    (tmp_path / "bad.csv").write_text("image,mask\na.nrrd,a_seg.nrrd\n")
    with pytest.raises(InputError, match="label"):
        list_cases(tmp_path / "bad.csv")


def test_label_resampled_onto_image_grid(tmp_path, phantom_small):
    """A label stored with a different (but overlapping) grid is brought onto the image grid."""
    _write_volume(tmp_path / "img.nii.gz", phantom_small.array, (2.0, 2.0, 3.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    up = np.repeat(phantom_small.label, 2, axis=2)  # half the column spacing
    _write_volume(tmp_path / "lab.nii.gz", up, (1.0, 2.0, 3.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), origin=(-0.5, 0, 0))
    (tmp_path / "l.csv").write_text("image,label\nimg.nii.gz,lab.nii.gz\n")
    d = list_cases(tmp_path / "l.csv")[0].load()
    assert d.label.shape == phantom_small.label.shape
    assert np.array_equal(d.label, phantom_small.label)


def test_slices2d_synthetic_flip_and_threshold(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    img = np.zeros((40, 50), np.uint8)
    img[:5] = 200  # "spine" at the top in DICOM row order
    m = np.zeros((40, 50), np.uint8)
    m[10:20, 5:15] = 250
    m[30:32, 5:15] = 100  # JPEG-like gray below the threshold
    Image.fromarray(img).convert("RGB").save(tmp_path / "images" / "PANCREAS_0042-1077.png")
    Image.fromarray(m).save(tmp_path / "masks" / "PANCREAS_0042-1077.png")
    (c,) = slices2d_cases(tmp_path, pixel_spacing_mm=0.7)
    assert c.patient_id == "PANCREAS_0042"
    d = c.load()
    assert d.spacing[:2] == (0.7, 0.7) and d.slice_numbers == [76]
    assert (d.image[0, -5:] == 200).all() and (d.image[0, :-5] == 0).all()  # flipped: top rows now at the bottom
    assert d.label.sum() == 100 and d.label[0, 20:30, 5:15].all()  # rows 10:20 flipped to 20:30


def test_select_labels():
    lab = np.array([0, 1, 2, 3, 2])
    assert select_labels(lab, None).tolist() == [0, 1, 1, 1, 1]
    assert select_labels(lab, [2]).tolist() == [0, 0, 1, 0, 1]
    assert select_labels(lab, [1, 3]).tolist() == [0, 1, 0, 1, 0]


# ------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------
def test_cache_contents_match_engine_preprocessing(tmp_path):
    from lsnet.pipeline.preprocess import slice_grid, to_canvas, window

    cases = phantom_cases(2, seed=3, shape=(6, 48, 48), spacing=(2.5, 2.5, 3.0))
    cache = SliceCache(tmp_path / "c", SMALL).build(cases, progress=False)
    img, lab = cache.arrays("phantom_3")
    data = cases[0].load()
    grid = slice_grid((48, 48), (2.5, 2.5), 2.0, 32)
    assert img.shape == (6, *grid.canvas_hw) and img.dtype == np.uint8 and lab.dtype == np.uint8
    ref = to_canvas(window(torch.from_numpy(data.image.astype(np.float32))[:, None], (0, 255)), grid)[:, 0].numpy()
    assert np.abs(img.astype(np.float32) / 255.0 - ref).max() <= 0.5 / 255 + 1e-6  # rounded to 1/255
    recs = cache.slice_records(["phantom_3"])
    for _, pid, r in recs:
        assert pid == "phantom_3"
        m = lab[r["k"]]
        assert r["fg"] == bool(m.any())
        if r["fg"]:
            ys, xs = np.nonzero(m)
            assert r["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert r["nb"] == [max(r["k"] - 1, 0), min(r["k"] + 1, 5)]
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert set(index["cases"]) == {"phantom_3", "phantom_4"}


def test_cache_resumes_and_invalidates_changed_sources(tmp_path, phantom_small):
    from PIL import Image

    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for n in range(3):
        Image.fromarray(np.full((64, 64), 60 + n, np.uint8)).save(src / "images" / f"P_{n}-1001.png")
        m = np.zeros((64, 64), np.uint8)
        m[20:30, 20 + n : 30 + n] = 255
        Image.fromarray(m).save(src / "masks" / f"P_{n}-1001.png")
    cases = slices2d_cases(src, patient_regex=r"(P_\d)")
    root = tmp_path / "cache"
    cache = SliceCache(root, SMALL)
    cache.build(cases, progress=False)
    dirs = {c.case_id: root / cache.metas[c.case_id]["dir"] for c in cases}
    stamp = {k: (d / "meta.json").stat().st_mtime_ns for k, d in dirs.items()}
    assert all(cache.entry_valid(c) for c in cases)

    # touching a file (same content) keeps the entry
    later = time.time() + 5
    os.utime(src / "images" / "P_0-1001.png", (later, later))
    assert cache.entry_valid(cases[0])
    # changing the content invalidates exactly that entry
    m = np.zeros((64, 64), np.uint8)
    m[40:50, 40:50] = 255
    Image.fromarray(m).save(src / "masks" / "P_1-1001.png")
    assert not cache.entry_valid(cases[1]) and cache.entry_valid(cases[2])
    # an interrupted build leaves a temporary folder; it is removed and the stale entry rebuilt
    (root / "junk.tmp123").mkdir()
    cache.build(cases, progress=False)
    assert not (root / "junk.tmp123").exists()
    new = {k: (d / "meta.json").stat().st_mtime_ns for k, d in dirs.items()}
    assert new["P_0-1001"] == stamp["P_0-1001"] and new["P_2-1001"] == stamp["P_2-1001"]
    assert new["P_1-1001"] != stamp["P_1-1001"]
    rec = cache.slice_records(["P_1-1001"])[0][2]
    assert rec["bbox"][0] >= 15  # new mask at column 40 x 0.8 mm / 2 mm = 16 (old one: ~8)

    # other preprocessing parameters invalidate everything and cannot open the old index
    other = SliceCache(root, CacheParams(window=(-100.0, 200.0), spacing=2.0))
    assert not other.entry_valid(cases[0])
    with pytest.raises(CacheError, match="rebuild"):
        other.open()


def test_cache_verification_on_load(tmp_path):
    cases = phantom_cases(1, seed=0, shape=(4, 40, 40))
    cache = SliceCache(tmp_path, SMALL).build(cases, progress=False)
    d = tmp_path / cache.metas["phantom_0"]["dir"]
    SliceCache(tmp_path, SMALL).open(verify="full")
    # same shape, different bytes: only the full check notices
    a = np.load(d / "label.npy")
    a[0, 0, 0] ^= 1
    np.save(d / "label.npy", a)
    SliceCache(tmp_path, SMALL).open()
    with pytest.raises(CacheError, match="checksum"):
        SliceCache(tmp_path, SMALL).open(verify="full")
    # wrong shape: the quick check notices
    np.save(d / "label.npy", a[:2])
    with pytest.raises(CacheError, match="shape"):
        SliceCache(tmp_path, SMALL).open()
    shutil.rmtree(d)
    with pytest.raises(CacheError):
        SliceCache(tmp_path, SMALL).open()


# ------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------
class _C:
    def __init__(self, cid, pid):
        self.case_id, self.patient_id = cid, pid


def test_patient_level_kfold():
    cases = [_C(f"c{i}", f"p{i % 13}") for i in range(60)] + [_C("vol", "p0")]
    seen = {}
    for f in range(4):
        tr, va = split_cases(cases, f, k=4, seed=1)
        assert not ({c.patient_id for c in tr} & {c.patient_id for c in va})
        assert len(tr) + len(va) == len(cases)
        for c in va:
            assert c.case_id not in seen
            seen[c.case_id] = f
    assert len(seen) == len(cases)
    sizes = np.bincount(list(seen.values()))
    assert sizes.max() - sizes.min() <= 6
    # deterministic, order independent, seed dependent
    a = patient_folds([c.patient_id for c in cases], 4, seed=1)
    b = patient_folds([c.patient_id for c in reversed(cases)], 4, seed=1)
    assert a == b
    assert any(patient_folds([c.patient_id for c in cases], 4, seed=s) != a for s in range(2, 6))
    with pytest.raises(InputError):
        patient_folds(["a", "b"], 4)
    with pytest.raises(InputError):
        split_cases(cases, 4, k=4)


# ------------------------------------------------------------------------------------------------
# augmentation, crops, sampler
# ------------------------------------------------------------------------------------------------
def test_augmentation_moves_image_and_mask_together():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 64, 96)
    mask[:, 20:40, 30:50] = 1
    mask[1, 5:9, 70:90] = 1
    img = mask.unsqueeze(1).repeat(1, 3, 1, 1)
    cfg = AugmentConfig(p_geometric=1.0, contrast=(1.0, 1.0), brightness=0.0, noise_std=0.0, rotate_deg=20)
    out_img, out_mask = augment_batch(img, mask, cfg, g)
    assert out_img.shape == img.shape and out_mask.shape == mask.shape
    assert not torch.equal(out_mask, mask)
    assert torch.equal((out_img[:, 1] >= 0.5).float(), out_mask)
    # disabled = identity
    same_i, same_m = augment_batch(img, mask, AugmentConfig(enabled=False), g)
    assert same_i is img and same_m is mask


def test_augmentation_scale_and_rotation_are_geometric():
    cfg = AugmentConfig(p_geometric=1.0, scale=(2.0, 2.0), rotate_deg=0.0, translate=0.0)
    theta = random_affine(1, (64, 128), cfg)
    mask = torch.zeros(1, 64, 128)
    mask[0, 28:36, 60:68] = 1  # 8 x 8 square at the centre
    _, out = warp(mask.unsqueeze(1), mask, theta)
    ys, xs = torch.nonzero(out[0], as_tuple=True)
    assert 15 <= int(ys.max() - ys.min() + 1) <= 17 and 15 <= int(xs.max() - xs.min() + 1) <= 17
    # 90 degrees on a non-square image keeps a centred square a square (aspect-correct rotation)
    cfg90 = AugmentConfig(p_geometric=1.0, scale=(1.0, 1.0), rotate_deg=90.0, translate=0.0)
    g = torch.Generator().manual_seed(1)
    th = random_affine(1, (64, 128), cfg90, generator=g)
    if abs(abs(float(th[0, 0, 0])) - 0.0) > 1e-3:  # angle drawn in [-90, 90]; force exactly 90
        th = torch.tensor([[[0.0, 0.5, 0.0], [-2.0, 0.0, 0.0]]])
    rect = torch.zeros(1, 64, 128)
    rect[0, 30:34, 54:74] = 1  # 4 x 20 bar
    _, rot = warp(rect.unsqueeze(1), rect, th)
    ys, xs = torch.nonzero(rot[0], as_tuple=True)
    assert int(ys.max() - ys.min() + 1) >= 18 and int(xs.max() - xs.min() + 1) <= 6


@pytest.mark.gpu
def test_augmentation_on_cuda():
    mask = torch.zeros(2, 64, 64, device="cuda")
    mask[:, 20:40, 20:40] = 1
    img, m = augment_batch(mask.unsqueeze(1), mask, AugmentConfig(p_geometric=1.0))
    assert img.device.type == "cuda" and m.device.type == "cuda"


def test_slice_dataset_crops_keep_foreground_and_neighbours(tmp_path):
    cases = phantom_cases(2, seed=0, shape=(24, 80, 80), spacing=(2.0, 2.0, 2.5), target_scale=0.5)
    cache = SliceCache(tmp_path, SMALL).build(cases, progress=False)
    ds = SliceDataset(cache, ["phantom_0", "phantom_1"], size=(64, 64), in_channels=3, train=True, seed=0)
    fg = ds.has_fg()
    assert fg.any() and (~fg).any()
    img, lab = cache.arrays("phantom_0")
    for i in np.flatnonzero(fg):
        s = ds[int(i)]
        assert s["image"].shape == (3, 64, 64) and s["mask"].shape == (64, 64)
        rec = ds.records[int(i)][2]
        x0, y0, x1, y1 = rec["bbox"]
        if x1 - x0 <= 64 and y1 - y0 <= 64:
            assert int(s["mask"].sum()) == int(cache.arrays(ds.records[int(i)][0])[1][rec["k"]].sum())
    # 2.5-D channels are k-1, k, k+1 (validation crop is deterministic)
    val = SliceDataset(cache, ["phantom_0"], size=(128, 128), in_channels=3, train=False)
    assert img.shape[1:] == (96, 96)  # 80 px at 2 mm -> 80 px, canvas padded to 96
    s5 = val[5]["image"].numpy()
    assert np.allclose(s5[:, 16:112, 16:112], np.asarray(img[4:7], np.float32) / 255.0)  # centred, zero-padded
    assert not s5[:, :16].any() and not s5[:, 112:].any()
    assert torch.equal(val[5]["image"], val[5]["image"])


def test_epoch_sampler_negative_fraction_and_ddp_split():
    has_fg = np.array([True] * 40 + [False] * 200)
    s = EpochSampler(has_fg, negative_fraction=0.2, seed=0)
    idx = list(s)
    assert len(idx) == 50 and sum(has_fg[idx]) == 40
    s.set_epoch(1)
    assert list(s) != idx
    parts = [list(EpochSampler(has_fg, 0.2, seed=0, rank=r, world=3)) for r in range(3)]
    assert len({len(p) for p in parts}) == 1
    assert set().union(*map(set, parts)) == set(idx)


def test_random_crops_change_with_the_epoch_even_in_worker_processes(tmp_path):
    cases = phantom_cases(1, seed=2, shape=(6, 96, 96), spacing=(2.0, 2.0, 2.5), target_scale=0.3)
    cache = SliceCache(tmp_path, SMALL).build(cases, progress=False)
    ds = SliceDataset(cache, ["phantom_2"], size=(64, 64), train=True, seed=0)
    s = EpochSampler(np.ones(len(ds), bool), 0.0, shuffle=False, tag_epoch=True)
    first = list(s)
    assert first[0] == (0, 0)
    s.set_epoch(3)
    assert list(s)[0] == (0, 3)
    crops = [ds[(i, e)]["image"] for e in range(4) for i in [0]]
    assert any(not torch.equal(crops[0], c) for c in crops[1:])
    assert torch.equal(ds[(0, 2)]["image"], ds[(0, 2)]["image"])  # deterministic per (seed, epoch, index)


def test_pack_gives_a_small_source_free_cache(tmp_path):
    from PIL import Image

    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    rng = np.random.default_rng(0)
    for n in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64)).astype(np.uint8)).save(src / "images" / f"P_{n}-1001.png")
        m = np.zeros((64, 64), np.uint8)
        m[10:20, 10:30] = 255
        Image.fromarray(m).save(src / "masks" / f"P_{n}-1001.png")
    cases = slices2d_cases(src, patient_regex=r"(P_\d)")
    built = SliceCache(tmp_path / "cache", SMALL).build(cases + phantom_cases(1, shape=(4, 40, 40)), progress=False)
    assert cache_main(["pack", str(tmp_path / "cache"), str(tmp_path / "packed")]) == 0
    shutil.rmtree(src)  # the sources are gone: the packed cache must open alone
    packed = SliceCache(tmp_path / "packed", SMALL)
    assert sorted(packed.case_ids()) == sorted(built.metas)
    assert packed.case_ids(include_phantoms=False) == ["P_0-1001", "P_1-1001"]
    assert not list((tmp_path / "packed").rglob("*.npy"))
    packed.open(verify="full")  # unpacks once, in place, then memory-maps
    for cid in built.metas:
        for a, b in zip(built.arrays(cid), packed.arrays(cid)):
            assert isinstance(b, np.memmap) and np.array_equal(a, b)
    assert packed.patient_of("P_1-1001") == "P_1"
