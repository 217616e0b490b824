"""Input/output: everything that reads or writes a file, and the image geometry it is read into.

Holds: ``geometry`` (:class:`Volume`, canonical reorientation, IJK/LPS/RAS conventions of
docs/conventions.md), ``volume`` (NIfTI/NRRD/MHA/DICOM readers, SimpleITK), ``dicom_info`` (is this
plausible CT? modality, tilt, HU range, field of view), ``outputs`` (Slicer-format outputs: seg.nrrd,
heatmap, boxes.json, markups), ``dicom_seg`` (DICOM SEG, highdicom), ``terminology`` (standard names,
colours, codes), ``weights`` (safetensors + model cards; no architecture is known here).

May import: ``lsnet.errors``, ``lsnet._version``, ``lsnet.config``, ``lsnet.results`` and each other.
Never: ``method``, ``seeds``, ``architectures``, ``pipeline``, ``samples``, ``api``, ``app``.  torch
only where a function needs it (``geometry``, ``outputs``, ``terminology`` are imported by the Slicer
module before PyTorch is installed).
"""
