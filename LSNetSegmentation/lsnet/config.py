"""Architecture and preprocessing configuration, stored verbatim in every model card.

Values marked *paper* come from Xie et al., "L-SNet" (section 2 and 3.1).  Values marked *open* are
choices the paper leaves open; the reason for each is given next to it and collected in
``docs/method.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network and to preprocess its input."""

    architecture: str = "lsnet"
    """Which network family the weights belong to (``lsnet``; other seed systems add their own)."""

    # --- L-Net (paper section 2.1) ---------------------------------------------------------------
    lnet_backbone: str = "resnet18"  # paper: ResNet18 for the first stage
    # --- S-Net (paper section 2.3) ---------------------------------------------------------------
    snet_backbone: str = "resnet34"  # paper: ResNet34 for the second stage
    snet_structure: str = "unet"  # paper: "U-Net" or "FCN" basic structure (Table 1)
    width: int = 64
    """Channels of the first ResNet stage. 64 = torchvision ResNet (paper). *open*: the bundled model
    uses a narrower network (16) so that the weights stay a git-friendly size and match the small
    amount of real data we can train on."""
    snet_width: int = 0
    """*ours*: channels of S-Net's first ResNet stage when S-Net is to be wider (or narrower) than L-Net;
    0 = ``width`` (one width for both networks, as in the paper)."""
    box_snet_width: int = 0
    """*ours*: 0 = user-drawn boxes (the box-prompt path, ``Segmenter.segment_box``) go to S-Net, one network
    for both paths as in the paper; > 0 = the model also holds a second S-Net of this width (same
    structure and backbone), trained on jittered ground-truth boxes alone, that serves only box prompts
    (``lsnet.method.model.box_prompt_snet``); the automatic path is unchanged."""
    in_channels: int = 1
    """1 = one isolated axial slice (paper). 3 = 2.5-D (slice k-1, k, k+1 as channels), opt-in."""
    num_classes: int = 1
    """Foreground classes segmented by S-Net (C in M* of section 2.3); 1 = binary (pancreas)."""

    # --- RoI recalibration (section 2.2) ---------------------------------------------------------
    roi_size: int = 320  # paper: S-Net input H x W = 320 x 320
    alpha: float = 15.0  # paper: border margin alpha = 15 px (in L-Net input pixels), Eq. 3
    gamma: float = 0.1  # paper: decay of S-Net -> L-Net gradients

    # --- targets (section 2.1, Eq. 1) ------------------------------------------------------------
    delta: float = 20.0  # paper: Gaussian "variance" delta = 20 (in heatmap cells)
    beta: float = 2.0  # paper: tolerance beta = 2 (heatmap cells)

    # --- losses (section 2.5, Eqs. 5-6) ----------------------------------------------------------
    lam: float = 0.5  # paper: lambda
    dice_weight: float = 0.2  # paper: L_cls = Focal + 0.2 Dice
    focal_alpha: float = 0.5
    """*open*: class weight of the focal loss. Lin et al.'s 0.25 suits their 0.05 detection threshold; with
    the paper's 0.5 thresholds (heatmap and mask) 0.25 would move the decision boundary to ~75 % true
    foreground, so we use the neutral 0.5 (p > 0.5 iff foreground is more likely)."""
    focal_gamma: float = 2.0  # *open*: Lin et al. default

    # --- inference (section 2.5) -----------------------------------------------------------------
    heatmap_threshold: float = 0.5  # paper
    mask_threshold: float = 0.5  # *open*: S-Net probability -> mask
    min_box_size: float = 4.0
    """*open*: lower bound (input px) on l+r and t+b so a degenerate regression cannot produce a
    zero-area RoI (theta would be singular)."""

    # --- preprocessing (*open*: the paper does not say) --------------------------------------------
    window: tuple = (0.0, 255.0)
    """HU window mapped to [0, 1]. [0, 255] HU is the window of the public 2-D NIH slice set
    (../shared/data/pancreas-ct-slices) and keeps all soft tissue; the bundled model is trained on it."""
    spacing: float = 1.25
    """In-plane pixel size (mm) every slice is resampled to before L-Net; see ``preprocess.py``."""
    pad_multiple: int = 32  # L-Net downsamples 5 times
    roi_source_factor: int = 1
    """*ours*: RR samples S-Net's RoI from a canvas ``roi_source_factor`` times finer than L-Net's
    (pixels of ``spacing / roi_source_factor`` mm); L-Net sees that canvas average-pooled by the factor.
    Both canvases cover the same field of view, so theta (normalised coordinates) is the same for both.
    1 = RR samples L-Net's own input (the paper).  At 2 mm a pancreas is ~30 x 15 px, which S-Net's
    128 px RoI would otherwise upsample ~4x from a blurred canvas; see docs/method.md."""

    roi_zooms: tuple = (1.0,)
    """*ours*: test-time augmentation of S-Net over zoomed RoIs.  Every RoI is also sampled with its
    theta's scales multiplied by each factor (same centre; > 1 = more context), S-Net segments each, each
    probability goes back with its own theta^-1, and the RoI's probability is their mean (before the
    max over a slice's RoIs and the mask threshold).  Inference only (L-Net RoIs and user boxes alike);
    ``(1.0,)`` = one RoI as in the paper."""

    ensemble: int = 1
    """*ours*: number of L-SNet members whose heatmaps, box distances and mask probabilities are
    averaged at inference (``lsnet.method.ensemble``); 1 = one model (the paper)."""

    labels: list = field(default_factory=lambda: [{"value": 1, "name": "Pancreas", "snomed": "15776009"}])

    options: dict = field(default_factory=dict)
    """Architecture-specific options of the other seed systems (``rstn``, ``dsms_unet``, ``rpn_fcn``);
    keys and defaults are documented in each module (``*_DEFAULTS``); empty for ``lsnet``."""

    @property
    def snet_channels(self) -> int:
        """Width S-Net is built with: ``snet_width``, or ``width`` when that is 0."""
        return self.snet_width or self.width

    @property
    def roi_source_spacing(self) -> float:
        """Pixel size (mm) of the canvas RR samples from and the network input is cut from:
        ``spacing / roi_source_factor`` (= ``spacing``, L-Net's own grid, for the paper's factor 1)."""
        return self.spacing / self.roi_source_factor

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["window"] = list(self.window)
        d["roi_zooms"] = list(self.roi_zooms)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
        d = dict(d)
        if "window" in d:
            d["window"] = tuple(float(v) for v in d["window"])
        for key in ("snet_width", "box_snet_width"):
            if int(d.get(key, 0)) < 0:
                raise ValueError(f"{key} must be 0 or a positive channel count; got {d[key]}")
        if "roi_zooms" in d:
            d["roi_zooms"] = tuple(float(v) for v in d["roi_zooms"])
            if not d["roi_zooms"] or min(d["roi_zooms"]) <= 0:
                raise ValueError(f"roi_zooms must be positive factors, e.g. [1.0]; got {list(d['roi_zooms'])}")
        return cls(**d)
