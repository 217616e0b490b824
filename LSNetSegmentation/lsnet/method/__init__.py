"""The paper's method, L-SNet (Xie et al.): one file per piece, named after it.

Holds: ``heatmap`` (targets K*, T* of Eq. 1), ``recalibration`` (RR, theta of Eqs. 2-4 and theta^-1),
``losses`` (Eqs. 5-6: focal + Dice, DIoU), ``decode`` (the inference rule of section 2.5 and the
training-time top-3 draw), ``lnet`` (L-Net), ``snet`` (S-Net structures), ``resnet`` and ``decoder``
(encoders and decoder blocks), ``components`` (connected components on the device, for Eq. 1 and
decode), ``model`` (the ``LSNet`` module and its two alternating training losses), ``ensemble``
(ours, not the paper: several ``LSNet`` averaged behind the interface of one).

May import: ``lsnet.errors``, ``lsnet.config`` and each other; torch.  Never: ``io``, ``seeds``,
``architectures``, ``pipeline``, ``samples``, ``api``, ``app``.  Other rooms add S-Net structures with
``snet.register_structure`` instead of this room importing them.
"""
