"""The volume pipeline: from a :class:`lsnet.io.geometry.Volume` to a :class:`lsnet.results.SegmentationResult`.

Holds: ``device`` (device choice, clear errors), ``preprocess`` (HU window, in-plane scale policy,
canvas), ``inference`` (:class:`Segmenter`: batches of canonical slices through L-Net -> decode -> RR
-> S-Net -> theta^-1, CUDA OOM policy, box prompts), ``seed_inference`` (the same for the comparison
systems, and ``make_segmenter`` for any weights file), ``postprocess`` (the volume step: small 3-D
components; ours, not the paper's).

May import: ``lsnet.errors``, ``lsnet.config``, ``lsnet.results``, ``lsnet.io``, ``lsnet.method``,
``lsnet.seeds``, ``lsnet.architectures`` and each other.  Never: ``samples``, ``api``, ``app``.
"""
