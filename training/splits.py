"""Patient-level k-fold cross-validation splits (the paper uses 4 folds).

All cases of one patient (a volume, its isolated 2-D slices from another data set, ...) land in the
same fold, so no patient is ever both trained on and validated on.  Patients are shuffled with a seeded
generator and dealt to folds so that the folds hold nearly equal numbers of *cases* (greedy: the
patient with the most cases goes to the currently smallest fold).  Deterministic for a given seed and
set of patient ids (independent of the order the cases are listed in).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Sequence

from lsnet.errors import InputError


def patient_folds(patient_ids: Sequence[str], k: int = 4, seed: int = 0) -> dict:
    """Map each distinct patient id to a fold in ``0..k-1`` (``patient_ids`` may repeat: one per case)."""
    if k < 2:
        raise InputError(f"k-fold cross-validation needs k >= 2 folds (got {k})")
    counts: dict = defaultdict(int)
    for p in patient_ids:
        counts[str(p)] += 1
    if len(counts) < k:
        raise InputError(f"{len(counts)} patients cannot be split into {k} folds; use fewer folds or more patients")

    def key(p: str) -> str:  # seeded, order-independent shuffle
        return hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()

    order = sorted(counts, key=lambda p: (-counts[p], key(p)))
    sizes = [0] * k
    npat = [0] * k
    fold_of = {}
    for p in order:
        f = min(range(k), key=lambda i: (sizes[i], npat[i], i))
        fold_of[p] = f
        sizes[f] += counts[p]
        npat[f] += 1
    return fold_of


def split_cases(cases: Sequence, fold: int, k: int = 4, seed: int = 0) -> tuple:
    """``(train_cases, val_cases)`` for ``fold`` (validation = the cases of that fold's patients)."""
    if not 0 <= fold < k:
        raise InputError(f"fold {fold} out of range 0..{k - 1}")
    fold_of = patient_folds([c.patient_id for c in cases], k, seed)
    train = [c for c in cases if fold_of[c.patient_id] != fold]
    val = [c for c in cases if fold_of[c.patient_id] == fold]
    return train, val
