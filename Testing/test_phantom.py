"""Synthetic CT phantom (lsnet.samples.phantom): determinism, orientation, HU, target variability, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from lsnet.samples.phantom import TARGET_SCALE_RANGE, make_phantom, make_phantom_volume


def test_deterministic_per_seed_and_seeds_differ():
    a = make_phantom(shape=(12, 96, 96), seed=3)
    b = make_phantom(shape=(12, 96, 96), seed=3)
    c = make_phantom(shape=(12, 96, 96), seed=4)
    assert np.array_equal(a.array, b.array) and np.array_equal(a.label, b.label)
    assert a.target_scale == b.target_scale
    assert not np.array_equal(a.array, c.array)


def test_types_shapes_and_hu_of_tissues():
    p = make_phantom(seed=1)
    assert p.array.shape == (48, 160, 160) and p.array.dtype == np.int16
    assert p.label.shape == p.array.shape and p.label.dtype == np.uint8
    assert set(np.unique(p.label)) <= {0, 1} and p.label.sum() > 0
    assert p.spacing == (2.0, 2.0, 2.5)
    # air outside the body (corners), with noise
    assert abs(float(np.median(p.array[:, :4, :4])) + 1000) < 30
    # target organ between 40 and 120 HU before noise: its median is inside that range
    assert 40 <= float(np.median(p.array[p.label > 0])) <= 120
    # bone exists and is the brightest tissue
    assert (p.array > 700).sum() > 100
    # subcutaneous fat exists (a ring of about -100 HU)
    assert ((p.array > -160) & (p.array < -40)).sum() > 1000


def test_canonical_orientation_spine_posterior_liver_on_patient_right():
    p = make_phantom(shape=(24, 128, 128), seed=2, noise_hu=0.0)
    K, J, I = p.array.shape
    bone = p.array > 600
    rows, cols = np.nonzero(bone.any(0))
    assert rows.mean() > 0.6 * J, "spine must be posterior = bottom rows of a canonical slice"
    assert abs(cols.mean() - I / 2) < 0.1 * I, "spine must be at the centre column"
    # the liver (~60 HU, the largest soft-tissue blob) lies on the patient right = image left in the top slice
    top = ndimage.median_filter(p.array[-1].astype(np.float32), 5)
    soft = (top > 40) & (top < 90)
    lab, n = ndimage.label(soft)
    sizes = ndimage.sum(soft, lab, range(1, n + 1))
    big = lab == (1 + int(np.argmax(sizes)))
    assert np.nonzero(big)[1].mean() < I / 2


def test_target_size_and_position_vary_and_fragments_occur():
    extents, centres, max_fragments = [], [], 0
    for seed in range(8):
        p = make_phantom(shape=(32, 128, 128), seed=seed)
        lab = p.label
        assert lab.any(), f"seed {seed}: empty target"
        ks = np.flatnonzero(lab.any((1, 2)))
        cols = np.flatnonzero(lab.any((0, 1)))
        extents.append(cols.max() - cols.min() + 1)
        centres.append(np.argwhere(lab).mean(0))
        max_fragments = max(max_fragments, max(ndimage.label(lab[k], np.ones((3, 3)))[1] for k in ks))
    assert max(extents) > 3 * min(extents)
    assert np.ptp(np.array(centres)[:, 0]) > 4  # slice range moves
    assert max_fragments >= 2


def test_target_scale_controls_size():
    small = make_phantom(shape=(32, 160, 160), seed=5, target_scale=TARGET_SCALE_RANGE[0])
    large = make_phantom(shape=(32, 160, 160), seed=5, target_scale=TARGET_SCALE_RANGE[1])
    ext = lambda lab: np.ptp(np.flatnonzero(lab.any((0, 1)))) + 1  # noqa: E731
    assert ext(small.label) <= 15
    body_width = np.ptp(np.flatnonzero((large.array[16] > -500).any(0))) + 1
    assert ext(large.label) >= 0.45 * body_width
    assert small.target_scale == TARGET_SCALE_RANGE[0]


def test_default_size_is_fast():
    make_phantom(seed=0)  # warm up
    t = time.process_time()  # CPU time: robust against other processes competing for the cores
    make_phantom(seed=11)
    assert time.process_time() - t < 1.0  # ~0.15 s on one core; the target is < 0.5 s


def test_phantom_volume_geometry():
    image, label = make_phantom_volume(shape=(8, 64, 64), spacing=(1.5, 1.5, 3.0), seed=0)
    assert image.shape == (8, 64, 64) and label.shape == (8, 64, 64)
    assert np.allclose(image.direction, np.eye(3))
    assert image.spacing == (1.5, 1.5, 3.0)
    assert image.same_geometry(label)
    assert label.array.dtype == np.uint8


def test_too_small_shape_is_rejected():
    with pytest.raises(ValueError):
        make_phantom(shape=(4, 8, 8))


def test_unpacks_as_array_label_spacing():
    array, label, spacing = make_phantom(shape=(4, 32, 32), seed=0)
    assert array.shape == label.shape == (4, 32, 32) and spacing == (2.0, 2.0, 2.5)
