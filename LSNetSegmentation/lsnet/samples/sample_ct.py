"""The shipped sample CT: a reduced copy of NIH Pancreas-CT PANCREAS_0001 with its manual label.

Files in ``LSNetSegmentation/Resources/SampleData/`` (made by ``python -m training.sample_ct``; licence
CC BY 3.0, citation in the README there).  This patient is in the bundled model's training data: the
sample shows the pipeline, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

from lsnet.errors import InputError
from lsnet.io.geometry import Volume
from lsnet.io.volume import read_label, read_volume

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"
CT_FILE = "PANCREAS_0001_reduced.nrrd"
LABEL_FILE = "PANCREAS_0001_reduced_label.nrrd"
CITATION = "NIH Pancreas-CT, Roth et al. 2016, TCIA, doi:10.7937/K9/TCIA.2016.tNB1kqBU (CC BY 3.0)"
TRAINING_NOTE = ("this patient (PANCREAS_0001) is in the bundled model's training data, so this DSC shows the "
                 "pipeline working, not accuracy; accuracy on unseen patients is in docs/results.md")


def sample_ct_paths() -> tuple[Path, Path]:
    """``(CT, label)`` file paths of the sample; :class:`InputError` if the files are missing."""
    ct, label = SAMPLE_DIR / CT_FILE, SAMPLE_DIR / LABEL_FILE
    for p in (ct, label):
        if not p.is_file():
            raise InputError(f"The sample CT file {p} is missing; reinstall LSNetSegmentation or run "
                             "'python -m training.sample_ct' in a checkout with ../shared/data.")
    return ct, label


def load_sample_ct() -> tuple[Volume, Volume]:
    """The sample as ``(image, label)`` volumes on the same grid (HU int16, label uint8 {0, 1})."""
    ct, label = sample_ct_paths()
    image = read_volume(ct)
    return image, read_label(label, reference=image)
