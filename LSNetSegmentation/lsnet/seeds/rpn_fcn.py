"""End-to-end detection-segmentation network with RoI convolution (Zhang et al., "RPN-FCN").

Pieces (paper section 2, Fig. 1):

* Backbone: stride-16 feature map (the paper: VGG16 conv5 without pool5).  Here: the engine's ResNet
  encoder (``config.snet_backbone``) up to ``layer3`` = ``c4`` ``(B, 4w, H/16, W/16)``; ``layer4`` is
  not built.
* Localisation unit: the Region Proposal Network of Faster R-CNN on ``c4``: 3x3 conv + ReLU, an
  objectness logit and 4 box deltas per anchor; anchors of ``anchor_sizes`` x ``anchor_ratios``
  centred on the cell centres ``(16x+8, 16y+8)`` (edge coordinates, docs/conventions.md).  Proposals
  = anchors + deltas, clipped to the image, objectness > ``score_threshold`` (the paper passes the
  regions "classified as foreground"), NMS, at most ``max_rois`` per slice.
* RoI convolution (:class:`RoIConv2d`, :class:`RoIConvFunction`): Eq. 1 — an ordinary convolution
  whose output is zero at every position outside the union of the RoIs; backward = Eq. 2 — the
  incoming gradient is masked by the same indicator before the input and weight gradients are
  formed, so positions outside the RoIs contribute nothing.  One RoI conv layer on ``c4``, followed
  by a 3x3 conv, a 1x1 classifier and a x16 transposed convolution (bilinear initialisation, FCN-32s
  style; the paper: "upsampled by a factor of 16").
* Loss: ``L = L_reg + L_cls + L_seg`` — RPN smooth-L1 box regression on positive anchors, RPN binary
  cross-entropy on the sampled anchors, and a pixel cross-entropy computed once on the full-image
  output over the pixels inside the union of the RoIs (no pixel counted twice).
* Inference: the probability is the segmentation output inside the union of the proposals, 0
  outside (pixels outside every RoI are background).

Open choices / deviations (also in docs/seed_models.md):

* ResNet instead of VGG16 (one encoder in the engine; ImageNet-loadable); sigmoid objectness (one
  logit per anchor) instead of the 2-way softmax.
* Anchors: sizes 16-128 px x ratios 0.5/1/2 (the pancreas on the 1.25 mm canvas is ~10-150 px; the
  Faster R-CNN defaults 128-512 are for natural images).  Labels: IoU >= 0.7 positive, < 0.3
  negative, plus the best anchor of every object; 256 sampled anchors, <= 50 % positive (Faster
  R-CNN).  Cross-boundary anchors are kept (small images).  Objects = 8-connected components of the
  label (``components.py``, as for L-Net).
* ``L_reg`` = smooth-L1 (beta 1/9) summed over the 4 deltas, averaged over positive anchors;
  ``L_cls`` averaged over the sampled anchors; ``L_seg`` averaged over the RoI pixels.  No weights.
* Training RoIs = proposals (detached: the RoI mask is binary, no gradient to the boxes) plus the
  ground-truth boxes (``train_with_gt_boxes``, as Faster R-CNN adds them to the second stage's
  proposals) so that the segmentation branch learns from the first iteration.
* A feature cell is inside an RoI when its 16 x 16 pixel footprint intersects the box (a box smaller
  than a cell still opens one cell); an output pixel is inside when its footprint intersects a box.
* The RoI conv is computed as a full convolution followed by the mask (same values and gradients as
  Eq. 1-2; the paper's point of computing only inside the RoIs is a speed optimisation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lsnet.config import ModelConfig
from lsnet.method.components import components
from lsnet.method.resnet import ResNetEncoder
from lsnet.seeds.common import SlicePrediction, check_binary, resolve_options

STRIDE = 16

RPN_DEFAULTS = {
    "anchor_sizes": [16, 32, 64, 128],
    "anchor_ratios": [0.5, 1.0, 2.0],
    "pos_iou": 0.7,
    "neg_iou": 0.3,
    "anchors_per_image": 256,
    "pos_fraction": 0.5,
    "score_threshold": 0.5,
    "nms_iou": 0.7,
    "pre_nms": 200,
    "max_rois": 8,
    "train_with_gt_boxes": True,
}

BBOX_CLIP = math.log(1000.0 / 16)


# ------------------------------------------------------------------------------ RoI convolution
class RoIConvFunction(torch.autograd.Function):
    """Eq. 1 forward, Eq. 2 backward.

    ``z`` ``(B, C_in, H, W)``, ``weight`` ``(C_out, C_in, k, k)``, ``bias`` ``(C_out,)`` or None,
    ``mask`` ``(B, 1, H_o, W_o)`` in {0, 1} (the indicator of the union of RoIs on the output grid)
    -> ``y`` ``(B, C_out, H_o, W_o)`` = ``mask * conv(z)``.  Backward: ``g = mask * dE/dy``;
    ``dE/dz = conv_transpose(g, w)``; ``dE/dw = correlate(z, g)``; ``dE/db = sum g``; no gradient for
    the mask.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, z, weight, bias, mask, stride=1, padding=0, dilation=1, groups=1):
        mask = mask.to(z.dtype)
        ctx.save_for_backward(z, weight, mask)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        return F.conv2d(z, weight, bias, stride, padding, dilation, groups) * mask

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y):
        z, weight, mask = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        g = grad_y * mask  # the indicator of Eq. 2
        gz = gw = gb = None
        if ctx.needs_input_grad[0]:
            gz = torch.nn.grad.conv2d_input(z.shape, weight, g, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            gw = torch.nn.grad.conv2d_weight(z, weight.shape, g, stride, padding, dilation, groups)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3))
        return gz, gw, gb, None, None, None, None, None


class RoIConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose ``forward(z, mask)`` is the RoI convolution (:class:`RoIConvFunction`)."""

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("RoIConv2d supports integer zero padding only")
        return RoIConvFunction.apply(z, self.weight, self.bias, mask, self.stride, self.padding, self.dilation, self.groups)


def roi_mask(boxes: torch.Tensor, batch: torch.Tensor, batch_size: int, hw, stride: int = 1) -> torch.Tensor:
    """Indicator of the union of RoIs on a grid of ``stride``-pixel cells: ``boxes`` ``(N, 4)``
    ``(x0, y0, x1, y1)`` input px, ``batch`` ``(N,)`` -> ``(batch_size, 1, h, w)`` float {0, 1}.
    Cell ``(x, y)`` spans ``[s x, s x + s) x [s y, s y + s)``; it is inside when it intersects a box."""
    h, w = int(hw[0]), int(hw[1])
    dev = boxes.device
    out = torch.zeros(batch_size, h * w, device=dev)
    if len(boxes):
        xs = torch.arange(w, device=dev, dtype=torch.float32) * stride
        ys = torch.arange(h, device=dev, dtype=torch.float32) * stride
        b = boxes.float()
        inx = (xs[None] < b[:, 2:3]) & (xs[None] + stride > b[:, 0:1])  # (N, w)
        iny = (ys[None] < b[:, 3:4]) & (ys[None] + stride > b[:, 1:2])  # (N, h)
        m = (iny[:, :, None] & inx[:, None, :]).reshape(len(b), -1).float()
        out.index_add_(0, batch.long(), m)
    return (out > 0).float().view(batch_size, 1, h, w)


# ------------------------------------------------------------------------------ boxes
def make_anchors(feat_hw, sizes, ratios, device=None) -> torch.Tensor:
    """Anchors ``(h * w * A, 4)`` xyxy input px, ordered (y, x, anchor); ratio = height / width."""
    h, w = feat_hw
    base = []
    for s in sizes:
        for r in ratios:
            aw, ah = s / math.sqrt(r), s * math.sqrt(r)
            base.append([-aw / 2, -ah / 2, aw / 2, ah / 2])
    base = torch.tensor(base, dtype=torch.float32, device=device)  # (A, 4)
    cx = torch.arange(w, device=device, dtype=torch.float32) * STRIDE + STRIDE / 2
    cy = torch.arange(h, device=device, dtype=torch.float32) * STRIDE + STRIDE / 2
    yy, xx = torch.meshgrid(cy, cx, indexing="ij")
    ctr = torch.stack([xx, yy, xx, yy], -1).view(h, w, 1, 4)
    return (ctr + base.view(1, 1, -1, 4)).view(-1, 4)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix of ``(N, 4)`` and ``(M, 4)`` xyxy boxes -> ``(N, M)``."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None] - inter).clamp_min(1e-6)


def encode_boxes(anchors: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Faster R-CNN deltas ``(dx, dy, dw, dh)`` of ``gt`` w.r.t. ``anchors`` (both ``(N, 4)``)."""
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + aw / 2, anchors[:, 1] + ah / 2
    gw, gh = (gt[:, 2] - gt[:, 0]).clamp_min(1e-3), (gt[:, 3] - gt[:, 1]).clamp_min(1e-3)
    gx, gy = gt[:, 0] + gw / 2, gt[:, 1] + gh / 2
    return torch.stack([(gx - ax) / aw, (gy - ay) / ah, torch.log(gw / aw), torch.log(gh / ah)], 1)


def decode_boxes(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_boxes` (``dw``, ``dh`` clipped at log(1000/16))."""
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + aw / 2, anchors[:, 1] + ah / 2
    dx, dy, dw, dh = deltas.float().unbind(1)
    x, y = ax + dx * aw, ay + dy * ah
    w, h = aw * torch.exp(dw.clamp(max=BBOX_CLIP)), ah * torch.exp(dh.clamp(max=BBOX_CLIP))
    return torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], 1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy non-maximum suppression -> kept indices, by decreasing score."""
    order = scores.argsort(descending=True)
    boxes = boxes[order]
    ious = box_iou(boxes, boxes)
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1:] &= ious[i, i + 1:] <= iou
    return order[keep]


# ------------------------------------------------------------------------------ the network
class RPNFCN(nn.Module):
    """``predict_slices`` / ``training_losses`` of the seed interface; see the module docstring."""

    iterative = False

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig(architecture="rpn_fcn")
        c = self.config
        check_binary(c)
        o = resolve_options(c, RPN_DEFAULTS)
        self.options = o
        self.encoder = ResNetEncoder(c.snet_backbone, c.in_channels, c.width)
        del self.encoder.layer4  # stride-16 trunk (VGG16 conv5 without pool5 in the paper)
        cf = self.encoder.channels[3]
        na = len(o["anchor_sizes"]) * len(o["anchor_ratios"])
        self.rpn_conv = nn.Conv2d(cf, cf, 3, padding=1)
        self.rpn_cls = nn.Conv2d(cf, na, 1)
        self.rpn_reg = nn.Conv2d(cf, 4 * na, 1)
        for m in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        d = cf
        self.roi_conv = RoIConv2d(cf, d, 3, padding=1)
        self.seg_conv = nn.Conv2d(d, d, 3, padding=1)
        self.classifier = nn.Conv2d(d, 1, 1)
        self.upsample = nn.ConvTranspose2d(1, 1, 2 * STRIDE, stride=STRIDE, padding=STRIDE // 2, bias=False)
        with torch.no_grad():  # bilinear interpolation kernel (FCN)
            k = 2 * STRIDE
            f = (k + 1) // 2
            centre = f - 0.5
            r = torch.arange(k, dtype=torch.float32)
            filt = 1 - (r - centre).abs() / f
            self.upsample.weight.copy_((filt[:, None] * filt[None, :]).view(1, 1, k, k))

    # ------------------------------------------------------------ pieces
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``c4`` ``(B, 4w, H/16, W/16)``."""
        e = self.encoder
        return e.layer3(e.layer2(e.layer1(e.maxpool(e.relu(e.bn1(e.conv1(x)))))))

    def rpn(self, f: torch.Tensor):
        """``f`` -> objectness logits ``(B, h*w*A)`` and deltas ``(B, h*w*A, 4)`` (anchor order of make_anchors)."""
        t = F.relu(self.rpn_conv(f))
        b = f.shape[0]
        logits = self.rpn_cls(t).permute(0, 2, 3, 1).reshape(b, -1)
        deltas = self.rpn_reg(t).permute(0, 2, 3, 1).reshape(b, -1, 4)
        return logits, deltas

    def anchors(self, f: torch.Tensor) -> torch.Tensor:
        return make_anchors(f.shape[-2:], self.options["anchor_sizes"], self.options["anchor_ratios"], f.device)

    @torch.no_grad()
    def proposals(self, logits, deltas, anchors, image_hw):
        """Foreground proposals: ``(boxes (N, 4), batch (N,), scores (N,))`` input px (module docstring)."""
        o = self.options
        h, w = image_hw
        out_b, out_i, out_s = [], [], []
        for i in range(logits.shape[0]):
            s = torch.sigmoid(logits[i].float())
            keep = torch.nonzero(s > o["score_threshold"]).flatten()
            if len(keep) > o["pre_nms"]:
                keep = keep[s[keep].topk(o["pre_nms"]).indices]
            if not len(keep):
                continue
            bx = decode_boxes(anchors[keep], deltas[i, keep])
            bx = torch.stack([bx[:, 0].clamp(0, w), bx[:, 1].clamp(0, h), bx[:, 2].clamp(0, w), bx[:, 3].clamp(0, h)], 1)
            ok = ((bx[:, 2] - bx[:, 0]) >= 1) & ((bx[:, 3] - bx[:, 1]) >= 1)
            bx, sc = bx[ok], s[keep][ok]
            kept = nms(bx, sc, o["nms_iou"])[: o["max_rois"]]
            out_b.append(bx[kept])
            out_s.append(sc[kept])
            out_i.append(torch.full((len(kept),), i, dtype=torch.long, device=logits.device))
        if not out_b:
            dev = logits.device
            return torch.zeros(0, 4, device=dev), torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, device=dev)
        return torch.cat(out_b), torch.cat(out_i), torch.cat(out_s)

    def segment(self, f: torch.Tensor, boxes, batch, image_hw) -> tuple[torch.Tensor, torch.Tensor]:
        """RoI conv branch: ``(logits (B, 1, H, W), pixel RoI mask (B, 1, H, W))``."""
        b = f.shape[0]
        fmask = roi_mask(boxes, batch, b, f.shape[-2:], STRIDE)
        y = F.relu(self.roi_conv(f, fmask))
        y = F.relu(self.seg_conv(y))
        logits = self.upsample(self.classifier(y))[..., : image_hw[0], : image_hw[1]]
        return logits, roi_mask(boxes, batch, b, image_hw, 1)

    # ------------------------------------------------------------ training
    def _rpn_targets(self, anchors, gt_boxes, gt_batch, batch_size):
        """Sampled anchor labels ``(B, A_total)`` (1 pos, 0 neg, -1 ignored) and matched gt boxes."""
        o = self.options
        n = anchors.shape[0]
        labels = torch.full((batch_size, n), -1.0, device=anchors.device)
        matched = torch.zeros(batch_size, n, 4, device=anchors.device)
        for i in range(batch_size):
            gt = gt_boxes[gt_batch == i]
            if len(gt):
                iou = box_iou(anchors, gt)  # (n, G)
                best, arg = iou.max(1)
                matched[i] = gt[arg]
                lab = torch.full((n,), -1.0, device=anchors.device)
                lab[best < o["neg_iou"]] = 0
                lab[best >= o["pos_iou"]] = 1
                lab[iou.argmax(0)] = 1  # best anchor of every object
            else:
                lab = torch.zeros(n, device=anchors.device)
            pos = torch.nonzero(lab == 1).flatten()
            neg = torch.nonzero(lab == 0).flatten()
            npos = min(len(pos), int(o["anchors_per_image"] * o["pos_fraction"]))
            pos = pos[torch.randperm(len(pos), device=pos.device)[:npos]]
            neg = neg[torch.randperm(len(neg), device=neg.device)[: o["anchors_per_image"] - npos]]
            labels[i, pos] = 1
            labels[i, neg] = 0
        return labels, matched

    def training_losses(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """``L = L_reg + L_cls + L_seg``; ``images`` ``(B, C, H, W)``, ``masks`` ``(B, H, W)``."""
        b = images.shape[0]
        hw = tuple(images.shape[-2:])
        f = self.features(images)
        logits, deltas = self.rpn(f)
        anchors = self.anchors(f)
        comp = components(masks > 0)
        gt_boxes, gt_batch = comp.boxes.float(), comp.batch
        labels, matched = self._rpn_targets(anchors, gt_boxes, gt_batch, b)
        sampled = labels >= 0
        l_cls = F.binary_cross_entropy_with_logits(logits.float()[sampled], labels[sampled])
        pos = labels == 1
        if bool(pos.any()):
            target = encode_boxes(anchors.expand(b, -1, -1)[pos], matched[pos])
            l_reg = F.smooth_l1_loss(deltas.float()[pos], target, beta=1.0 / 9, reduction="none").sum(1).mean()
        else:
            l_reg = deltas.sum() * 0.0
        boxes, batch, _ = self.proposals(logits.detach(), deltas.detach(), anchors, hw)
        nprop = len(boxes)
        if self.options["train_with_gt_boxes"] and len(gt_boxes):
            boxes, batch = torch.cat([boxes, gt_boxes]), torch.cat([batch, gt_batch])
        seg_logits, pmask = self.segment(f, boxes, batch, hw)
        inside = pmask[:, 0] > 0
        if bool(inside.any()):
            l_seg = F.binary_cross_entropy_with_logits(seg_logits.float()[:, 0][inside], masks.float()[inside])
        else:
            l_seg = seg_logits.sum() * 0.0
        loss = l_reg + l_cls + l_seg
        return {"loss": loss, "reg": l_reg.detach(), "cls": l_cls.detach(), "seg": l_seg.detach(), "num_proposals": torch.tensor(nprop)}

    # ------------------------------------------------------------ testing
    @torch.no_grad()
    def predict_slices(self, images: torch.Tensor) -> SlicePrediction:
        hw = tuple(images.shape[-2:])
        f = self.features(images)
        logits, deltas = self.rpn(f)
        boxes, batch, scores = self.proposals(logits, deltas, self.anchors(f), hw)
        seg, pmask = self.segment(f, boxes, batch, hw)
        return SlicePrediction(torch.sigmoid(seg.float()) * pmask, boxes, batch, scores)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> foreground probability ``(B, 1, H, W)`` (0 outside the proposals)."""
        return self.predict_slices(images).prob
