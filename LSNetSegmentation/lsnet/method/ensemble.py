"""An ensemble of L-SNet models that runs as one L-SNet (ours, not the paper).

The paper uses one model.  With 50 training patients and no pretrained encoders, one training run of
the bundled recipe varies by 3-5 points of slice DSC from another run of the same recipe
(docs/results.md), so averaging several runs (as nnU-Net averages its fold models) is the cheapest
way to a steadier model.  :class:`LSNetEnsemble` has the same interface as :class:`~lsnet.method.model.LSNet`
(``config``, ``lnet(x)``, ``snet(roi)``), so the inference rule of section 2.5 runs on it unchanged
(``lsnet.pipeline.inference.lsnet_predict``, the box-prompt path, training validation):

* **L-Net** (:class:`MeanLNet`): the members' heatmap *probabilities* are averaged (returned as the
  logit of the mean, so that ``sigmoid`` downstream gives the mean back) and so are their box
  distances T ``(B, 4, h, w)``, cell by cell.  The inference rule (threshold 0.5 -> components ->
  the peak cell's box) then runs once on the mean maps: one set of RoIs, as for one model.
* **S-Net** (:class:`MeanSNet`): every member segments the same recalibrated RoIs; their mask
  probabilities are averaged (again returned as a logit), then theta^-1 and the mask threshold as usual.

All members share one :class:`~lsnet.config.ModelConfig` (same architecture, canvas, RoI size,
thresholds); ``config.ensemble`` is their number.  Stored as one weights file: the state dict keys are
``lnet.nets.<i>.*`` and ``snet.nets.<i>.*`` (and ``box_snet.nets.<i>.*`` with ``config.box_snet_width``,
averaged like S-Net) (``lsnet.architectures.build_model`` builds this class for
an ``lsnet`` card with ``ensemble > 1``).  Inference costs ``ensemble`` times the networks of one model.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from lsnet.config import ModelConfig
from lsnet.method.model import LSNet

LOGIT_EPS = 1e-6
"""Probabilities are clamped to [eps, 1 - eps] before the logit, so that sigmoid(logit(p)) == p up to eps."""


def mean_probability_logit(logits: list) -> torch.Tensor:
    """Logits ``[(N, C, h, w)] * M`` of M members -> the logit of their mean sigmoid probability (fp32)."""
    p = torch.stack([torch.sigmoid(z.float()) for z in logits]).mean(0)
    return torch.logit(p, eps=LOGIT_EPS)


class MeanLNet(nn.Module):
    """L-Nets ``nets``; ``forward(x (B, C, H, W))`` -> ``(logit of the mean heatmap (B, 1, H/4, W/4),
    mean T (B, 4, H/4, W/4))``, both fp32."""

    def __init__(self, nets: list):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [net(x) for net in self.nets]
        T = torch.stack([t.float() for _, t in outs]).mean(0)
        return mean_probability_logit([k for k, _ in outs]), T


class MeanSNet(nn.Module):
    """S-Nets ``nets``; ``forward(roi (N, C, h, w))`` -> logit of the mean mask probability ``(N, K, h, w)`` (fp32)."""

    def __init__(self, nets: list):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, roi: torch.Tensor) -> torch.Tensor:
        return mean_probability_logit([net(roi) for net in self.nets])


class LSNetEnsemble(nn.Module):
    """``config.ensemble`` L-SNet members behind the interface of one ``LSNet`` (inference only).

    ``LSNetEnsemble(config)`` builds untrained members (to load a weights file into);
    :meth:`from_models` joins trained ``LSNet`` models.
    """

    def __init__(self, config: ModelConfig, models: list | None = None):
        super().__init__()
        if config.ensemble < 2:
            raise ValueError(f"an ensemble needs at least 2 members, not {config.ensemble}")
        if models is None:
            models = [LSNet(member_config(config)) for _ in range(config.ensemble)]
        if len(models) != config.ensemble:
            raise ValueError(f"config.ensemble is {config.ensemble} but {len(models)} models were given")
        self.config = config
        self.lnet = MeanLNet([m.lnet for m in models])
        self.snet = MeanSNet([m.snet for m in models])
        if config.box_snet_width:  # the members' box-prompt S-Nets, averaged like S-Net
            self.box_snet = MeanSNet([m.box_snet for m in models])

    @classmethod
    def from_models(cls, models: list) -> "LSNetEnsemble":
        """Join trained ``LSNet`` models (identical configs, ``ensemble`` 1) into one ensemble; the
        members' modules are shared, not copied.  ``ValueError`` when the configs differ."""
        if len(models) < 2:
            raise ValueError("an ensemble needs at least 2 models")
        first = models[0].config.to_dict()
        for i, m in enumerate(models[1:], 1):
            other = m.config.to_dict()
            diff = sorted(k for k in first if first[k] != other.get(k))
            if diff:
                raise ValueError(f"model {i} has another configuration than model 0 ({', '.join(diff)}): "
                                 "only models of one recipe and canvas can be averaged")
        return cls(replace(models[0].config, ensemble=len(models)), list(models))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` -> mean heatmap probabilities and mean T, as ``LSNet.forward``."""
        logits, T = self.lnet(images)
        return torch.sigmoid(logits), T


def member_config(config: ModelConfig) -> ModelConfig:
    """The configuration of one member of an ensemble configured by ``config``."""
    return replace(config, ensemble=1)
