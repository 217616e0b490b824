"""Shared fixtures of the reliability tests (test_fuzz, test_batch, test_dicom_seg, test_resources).

A tiny random-weight model is enough wherever only robustness, files and geometry are tested; its
output quality does not matter.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A tiny random L-SNet (width 8, RoI 64, 2 mm) saved as safetensors + card; returns its path."""
    import torch

    from lsnet.config import ModelConfig
    from lsnet.method.model import LSNet
    from lsnet.io.weights import save_model

    torch.manual_seed(0)
    model = LSNet(ModelConfig(width=8, roi_size=64, spacing=2.0))
    return save_model(model, tmp_path_factory.mktemp("tiny") / "tiny.safetensors", {"name": "tiny-random"})


@pytest.fixture(autouse=False)
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to a busy machine (spinning workers)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_ct_series(folder, num_slices: int = 3, rows: int = 32, cols: int = 32, *, modality: str = "CT",
                    spacing=(1.5, 1.5, 2.5), tilt_deg: float = 0.0, iop=(1, 0, 0, 0, 1, 0), series_uid=None,
                    study_uid=None, origin=(-24.0, -24.0, 100.0), seed: int = 0, prefix: str = "img"):
    """A synthetic single-frame DICOM series written with pydicom; returns the file paths (slice order).

    ``tilt_deg`` shears the slice positions along the column direction like a gantry tilt (and sets
    GantryDetectorTilt); pixel values are HU + 1024 with RescaleIntercept -1024 (air around a body).
    """
    import datetime
    from pathlib import Path

    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    for_uid = generate_uid()
    row_dir, col_dir = np.array(iop[:3], float), np.array(iop[3:], float)
    normal = np.cross(row_dir, col_dir)
    shear = np.tan(np.radians(tilt_deg)) * spacing[2]
    paths = []
    for k in range(num_slices):
        meta = FileMetaDataset()
        sop_class = CTImageStorage if modality == "CT" else MRImageStorage
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{prefix}{k:03d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.PatientName, ds.PatientID = "Fuzz^Test", "FUZZ1"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.StudyDate = datetime.date.today().strftime("%Y%m%d")
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        pos = np.array(origin, float) + normal * spacing[2] * k + col_dir * shear * k
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.PixelSpacing = [f"{spacing[1]}", f"{spacing[0]}"]
        ds.SliceThickness = f"{spacing[2]}"
        if tilt_deg:
            ds.GantryDetectorTilt = f"{tilt_deg}"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        img = np.full((rows, cols), 24, np.uint16)  # -1000 HU
        r0, r1, c0, c1 = rows // 4, (3 * rows) // 4, cols // 4, (3 * cols) // 4
        img[r0:r1, c0:c1] = 1024 + rng.integers(0, 120, size=(r1 - r0, c1 - c0))
        ds.PixelData = img.tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths
