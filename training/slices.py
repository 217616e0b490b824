"""Training/validation samples drawn from the slice cache: fixed-size crops and an epoch sampler.

The cache holds each slice on the engine's canvas (resampled to ``ModelConfig.spacing`` and padded to a
multiple of 32), which differs between cases; networks train on fixed ``H x W`` (paper: 320 x 320)
windows of it:

* training: a random window; when the slice has foreground the window is placed so that the whole
  foreground box lies inside it whenever it fits (else the window is centred on the box);
* validation: a deterministic window centred on the slice, shifted as little as needed to contain the
  foreground box.
Canvas smaller than the window is zero-padded (0 = bottom of the HU window).

:class:`EpochSampler` draws, per epoch, every foreground slice plus a random share of background-only
slices (``negative_fraction`` of the epoch), split across DDP ranks.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .cache import IMAGE_SCALE, SliceCache


def _place(lo_box: float, hi_box: float, size: int, extent: int, rng: Optional[np.random.Generator]) -> int:
    """Start of a window of ``size`` on an axis of ``extent`` pixels, containing [lo_box, hi_box) if possible."""
    if extent <= size:
        return -((size - extent) // 2) if rng is None else -int(rng.integers(0, size - extent + 1))
    lo_min = max(0, int(math.ceil(hi_box)) - size)
    lo_max = min(extent - size, int(math.floor(lo_box)))
    if lo_min > lo_max:  # box larger than the window: centre on it
        c = int(round((lo_box + hi_box) / 2 - size / 2))
        return min(max(c, 0), extent - size)
    if rng is None:
        c = int(round(extent / 2 - size / 2))
        return min(max(c, lo_min), lo_max)
    return int(rng.integers(lo_min, lo_max + 1))


def crop_window(arr: np.ndarray, y0: int, x0: int, size: tuple) -> np.ndarray:
    """``arr[..., y0:y0+h, x0:x0+w]`` with zero padding where the window leaves the array."""
    h, w = size
    H, W = arr.shape[-2:]
    out = np.zeros(arr.shape[:-2] + (h, w), dtype=arr.dtype)
    ys, ye = max(y0, 0), min(y0 + h, H)
    xs, xe = max(x0, 0), min(x0 + w, W)
    if ys < ye and xs < xe:
        out[..., ys - y0 : ye - y0, xs - x0 : xe - x0] = arr[..., ys:ye, xs:xe]
    return out


class SliceDataset(Dataset):
    """Item ``i`` -> ``{"image": float32 (C, H, W) in [0, 1], "mask": float32 (H, W) {0, 1}, "index": i}``.

    ``C`` = ``in_channels``: 1 (the slice) or 3 (2.5-D: slices k-1, k, k+1 from the cache's neighbour
    records; isolated 2-D slices repeat themselves).
    """

    def __init__(self, cache: SliceCache, case_ids: Sequence[str], size=(320, 320), in_channels: int = 1,
                 train: bool = True, seed: int = 0):
        if in_channels not in (1, 3):
            raise ValueError("in_channels must be 1 or 3")
        self.cache = cache
        self.records = cache.slice_records(case_ids)
        self.size = (int(size[0]), int(size[1]))
        self.in_channels = in_channels
        self.train = train
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def has_fg(self) -> np.ndarray:
        return np.array([bool(r[2]["fg"]) for r in self.records])

    def __getitem__(self, item) -> dict:
        # ``item`` is an index, or ``(index, epoch)`` from an :class:`EpochSampler` with ``tag_epoch``:
        # DataLoader worker processes hold their own copy of the dataset, so the epoch that seeds the
        # random crop must travel with the index
        i, epoch = (int(item[0]), int(item[1])) if isinstance(item, (tuple, list)) else (int(item), self.epoch)
        cid, _, rec = self.records[i]
        img, lab = self.cache.arrays(cid)
        k = rec["k"]
        if self.in_channels == 1:
            chans = [k]
        else:
            chans = [rec["nb"][0], k, rec["nb"][1]]
        H, W = img.shape[-2:]
        box = rec["bbox"] or [W / 2, H / 2, W / 2, H / 2]
        rng = np.random.default_rng((self.seed, epoch, i)) if self.train else None
        x0 = _place(box[0], box[2], self.size[1], W, rng)
        y0 = _place(box[1], box[3], self.size[0], H, rng)
        image = crop_window(np.stack([np.asarray(img[c]) for c in chans]), y0, x0, self.size).astype(np.float32)
        image *= np.float32(1.0 / IMAGE_SCALE)
        mask = crop_window(np.asarray(lab[k]), y0, x0, self.size).astype(np.float32)
        return {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask), "index": i}


class EpochSampler(Sampler):
    """Per epoch: all foreground slices + background slices making up ``negative_fraction`` of the
    epoch (drawn anew each epoch), shuffled with ``(seed, epoch)``, then split across ``world`` ranks
    (padded by repetition so every rank gets the same count).  ``tag_epoch`` yields ``(index, epoch)``
    pairs (see :meth:`SliceDataset.__getitem__`)."""

    def __init__(self, has_fg: np.ndarray, negative_fraction: float = 0.2, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world: int = 1, max_items: Optional[int] = None, tag_epoch: bool = False):
        self.tag_epoch = tag_epoch
        self.pos = np.flatnonzero(has_fg)
        self.neg = np.flatnonzero(~np.asarray(has_fg, dtype=bool))
        self.negative_fraction = float(negative_fraction)
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world = rank, world
        self.max_items = max_items
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        rng = np.random.default_rng((self.seed, self.epoch))
        f = min(max(self.negative_fraction, 0.0), 0.95)
        if len(self.pos):
            n_neg = min(len(self.neg), int(round(len(self.pos) * f / (1 - f))))
        else:
            n_neg = len(self.neg)
        neg = rng.choice(self.neg, size=n_neg, replace=False) if n_neg else np.zeros(0, dtype=np.int64)
        idx = np.concatenate([self.pos, neg]).astype(np.int64)
        if self.shuffle:
            idx = rng.permutation(idx)
        if self.max_items is not None:
            idx = idx[: self.max_items]
        if self.world > 1:
            per = int(math.ceil(len(idx) / self.world))
            idx = np.resize(idx, per * self.world) if len(idx) else idx
            idx = idx[self.rank :: self.world]
        return idx

    def __iter__(self):
        idx = self._indices().tolist()
        return iter([(i, self.epoch) for i in idx] if self.tag_epoch else idx)

    def __len__(self) -> int:
        return len(self._indices())
