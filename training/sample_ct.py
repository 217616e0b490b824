"""Make the project's one shipped sample CT: a reduced copy of NIH Pancreas-CT patient PANCREAS_0001.

    python -m training.sample_ct [--source ../shared/data/pancreas-ct] [--out LSNetSegmentation/Resources/SampleData]

Crop to the body (HU > -500) in-plane and to the abdomen around the pancreas along z (the labelled
slices and 45 mm either side, so pancreas-free slices are in it too), resample to 1.0 x 1.0 x 2.5 mm
(CT: linear; label: linear then > 0.5), store the CT as int16 HU and the label as uint8 in gzip NRRD
with the original's physical frame (LPS, direction cosines kept).  The result must stay under 6 MB.
Licence CC BY 3.0; cite Roth et al. 2016, TCIA, doi:10.7937/K9/TCIA.2016.tNB1kqBU (README.md next to
the files says so).  This patient is in every training set of this project: the sample shows the
pipeline, not accuracy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lsnet.errors import LSNetError
from lsnet.io.volume import read_label, read_volume

from .datasets import shared_data_dir

SPACING = (1.0, 1.0, 2.5)
MARGIN_MM = 45.0
MAX_BYTES = 6 * 1024 * 1024
CT_NAME = "PANCREAS_0001_reduced.nrrd"
LABEL_NAME = "PANCREAS_0001_reduced_label.nrrd"


def reduce(ct: sitk.Image, label: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """Crop (body in-plane, pancreas +- MARGIN_MM along k) and resample to :data:`SPACING`."""
    a = sitk.GetArrayFromImage(ct)  # (K, J, I)
    lab = sitk.GetArrayFromImage(label) > 0
    body = (a > -500).any(axis=0)
    js, is_ = np.flatnonzero(body.any(1)), np.flatnonzero(body.any(0))
    ks = np.flatnonzero(lab.any(axis=(1, 2)))
    m = int(round(MARGIN_MM / ct.GetSpacing()[2]))
    k0, k1 = max(0, ks[0] - m), min(a.shape[0], ks[-1] + 1 + m)
    lo = [int(is_[0]), int(js[0]), int(k0)]
    size = [int(is_[-1] + 1 - is_[0]), int(js[-1] + 1 - js[0]), int(k1 - k0)]
    ct_c = sitk.RegionOfInterest(ct, size, lo)
    lab_c = sitk.RegionOfInterest(sitk.Cast(label > 0, sitk.sitkFloat32), size, lo)
    new_size = [max(1, int(round(n * s / t))) for n, s, t in zip(ct_c.GetSize(), ct_c.GetSpacing(), SPACING)]
    ref = sitk.Image(new_size, sitk.sitkInt16)
    ref.SetSpacing(SPACING)
    ref.SetDirection(ct_c.GetDirection())
    # the first voxel's outer corner stays where it was: centre moves by half the spacing change
    d = np.array(ct_c.GetDirection()).reshape(3, 3)
    shift = d @ ((np.array(SPACING) - np.array(ct_c.GetSpacing())) / 2)
    ref.SetOrigin(tuple(np.array(ct_c.GetOrigin()) + shift))
    ct_r = sitk.Resample(ct_c, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    lab_r = sitk.Resample(lab_c, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return outside_body_to_air(ct_r), sitk.Cast(lab_r > 0.5, sitk.sitkUInt8)


def outside_body_to_air(ct: sitk.Image) -> sitk.Image:
    """Set everything outside the patient (the largest connected region above -500 HU, holes filled per
    slice: the table and the noise of the air go) to -1024 HU; the noisy air compressed worst."""
    body = sitk.ConnectedComponent(ct > -500)
    body = sitk.RelabelComponent(body, sortByObjectSize=True) == 1
    body = sitk.BinaryFillhole(body, fullyConnected=False)
    body = sitk.BinaryDilate(body, [3, 3, 0])
    a = sitk.GetArrayFromImage(ct)
    a[sitk.GetArrayFromImage(body) == 0] = -1024
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(ct)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.sample_ct", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=None, help="the pancreas-ct folder (default: ../shared/data/pancreas-ct)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "LSNetSegmentation" / "Resources" / "SampleData")
    args = ap.parse_args(argv)
    try:
        src = args.source or shared_data_dir() / "pancreas-ct"
        ct = read_volume(next((src / "PANCREAS_0001").rglob("1-001.dcm")).parent).to_sitk()
        label = read_label(src / "labels" / "label0001.nii.gz").to_sitk()
        ct_r, lab_r = reduce(ct, label)
        args.out.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(ct_r, str(args.out / CT_NAME), useCompression=True)
        sitk.WriteImage(lab_r, str(args.out / LABEL_NAME), useCompression=True)
        total = sum((args.out / n).stat().st_size for n in (CT_NAME, LABEL_NAME))
        print(f"{args.out / CT_NAME}: size {ct_r.GetSize()} spacing {ct_r.GetSpacing()}; {total / 1e6:.2f} MB with the label")
        if total > MAX_BYTES:
            raise LSNetError(f"the sample CT is {total / 1e6:.1f} MB, over the 6 MB limit")
    except LSNetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
