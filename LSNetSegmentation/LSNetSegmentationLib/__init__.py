"""Helpers of the LSNetSegmentation Slicer module.

Two kinds of modules live here:

* plain Python (``parameters``, ``roi_table``, ``geometry_bridge``, ``overlay_layout``, ``process``,
  ``model_card``, ``i18n`` and the requirement parsing of ``install``): they never import ``slicer``,
  ``qt``, ``vtk`` or ``torch`` at module level, so CI tests them with real libraries;
* Slicer-facing (``results`` and the installing half of ``install``): they import ``slicer`` only
  inside functions, so importing this package never needs Slicer or PyTorch;
* the module's logic and parameter node (``logic``): Slicer glue that imports ``slicer``, ``qt`` and
  ``vtk`` at module level (``LSNetSegmentation.py`` re-exports it; SlicerNNUnet splits the same way).
"""
