"""Training, evaluation and export of L-SNet and its baselines (not part of the bundled engine).

Run from the project root with the engine on the path, e.g.::

    PYTHONPATH=LSNetSegmentation python -m training.train --config training/configs/lsnet_paper.json --out runs/x

Modules: ``datasets`` (loaders of the data layouts users have), ``cache`` (preprocessed, memory-mapped
slice cache), ``slices`` (fixed-size crops and the epoch sampler), ``splits`` (patient-level k-fold),
``augment`` (torch augmentation), ``config`` (training configuration, ``configs/*.json``), ``methods``
(L-SNet and the baselines as trainable systems), ``metrics``, ``plots``, ``train`` (entry point) and
``evaluate`` (tables).
"""

import os
import sys

_ENGINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "LSNetSegmentation")
if os.path.isdir(_ENGINE) and _ENGINE not in sys.path:
    # the engine package ``lsnet`` lives in LSNetSegmentation/ (a Slicer extension layout); make
    # ``python -m training.train`` work from a plain checkout without installing it
    sys.path.insert(0, _ENGINE)
