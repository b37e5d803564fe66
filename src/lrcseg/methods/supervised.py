"""Supervised pre-training: Dice + cross-entropy on labelled slices (MONAI ``DiceCELoss``).

The upper reference for self-supervised initialisations: a segmentation head on the
full-resolution decoder features learns the labels of a labelled source dataset (``--labels``),
optionally with LRC on the same (and unlabelled ``--data``) slices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from monai.losses import DiceCELoss
from monai.networks.nets.flexible_unet import SegmentationHead
from torch import Tensor

from lrcseg.errors import ConfigError
from lrcseg.methods.base import GlobalMethod, MethodContext, Views
from lrcseg.methods.registry import register_method

if TYPE_CHECKING:
    from lrcseg.config import PretrainConfig
    from lrcseg.models.pretrain_net import PretrainNetwork


@register_method("supervised")
class Supervised(GlobalMethod):
    """L_seg = (DiceCE(head(d1), y1) + DiceCE(head(d2), y2)) / 2 on both labelled views.

    d*: (B, C_0, S, S) full-resolution decoder features of each view (3D: (B, C_0, S_d, S, S));
    head: a 3x3 (3x3x3) conv ``SegmentationHead`` to K = num_classes logits (label ids 0..K-1
    of the labelled dataset, 0 = background); y*: (B, S, S) (3D: (B, S_d, S, S)) label ids
    carried through the views' geometry (pixels outside the slice are background). DiceCE is
    MONAI's (softmax, one-hot, batch Dice), as in fine-tuning. Only the slices
    ``views.labelled`` marks enter L_seg; a batch without any gives an exact 0 that still
    depends on the head (unlabelled pool slices feed only LRC).

    Args:
        decoder_channels: C_0. num_classes: K >= 2. spatial_dims: 2 for slices, 3 for volume
            patches (``from_config`` takes the model's).
    """

    full_decoder = True
    needs_labels = True

    def __init__(self, decoder_channels: int, num_classes: int, spatial_dims: int = 2):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"Illegal num_classes {num_classes}: need background + >= 1 organ")
        self.num_classes = num_classes
        self.head = SegmentationHead(spatial_dims=spatial_dims, in_channels=decoder_channels,
                                     out_channels=num_classes, kernel_size=3)
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    @classmethod
    def from_config(cls, cfg: PretrainConfig, online: PretrainNetwork,
                    context: MethodContext) -> Supervised:
        """ConfigError without a labelled dataset (``context.num_classes`` None)."""
        if context.num_classes is None:
            raise ConfigError("method 'supervised' needs a labelled dataset: pass --labels DATASET")
        return cls(online.full_resolution_channels, context.num_classes,
                   spatial_dims=cfg.model.spatial_dims)

    def forward(self, out1: dict[str, Tensor], out2: dict[str, Tensor], views: Views
                ) -> tuple[Tensor, dict[str, Tensor]]:
        if views.labels1 is None or views.labels2 is None:
            raise ValueError("the supervised method needs the views' labels")
        losses = []
        for out, labels in ((out1, views.labels1), (out2, views.labels2)):
            logits = self.head(out["decoder"]).float()
            if views.labelled is not None:
                if not bool(views.labelled.any()):
                    losses.append(logits.sum() * 0.0)
                    continue
                logits, labels = logits[views.labelled], labels[views.labelled]
            losses.append(self.loss(logits, labels[:, None]))
        return (losses[0] + losses[1]) / 2, {}
