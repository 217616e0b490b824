"""Stub of Slicer's ``slicer`` package: only what ``LSNetSegmentation.py`` needs at import time."""


class vtkMRMLNode:  # noqa: N801 - Slicer's class names
    pass


class vtkMRMLScalarVolumeNode(vtkMRMLNode):  # noqa: N801
    pass


class vtkMRMLSegmentationNode(vtkMRMLNode):  # noqa: N801
    pass


app = None
mrmlScene = None
