"""The comparison systems of the paper's tables ("seed systems"): RSTN (``rstn``), DSMS U-Net
(``dsms_unet``), RPN-FCN with RoI convolution (``rpn_fcn``), and their shared interface (``common``).

May import: ``lsnet.errors``, ``lsnet.config``, ``lsnet.method`` (encoders, decoder, losses, RR) and
each other.  Never: ``io``, ``architectures``, ``pipeline``, ``samples``, ``api``, ``app`` — running
them on volumes is the pipeline's job (``lsnet.pipeline.seed_inference``).
"""
