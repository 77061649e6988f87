"""torchvision's ``RoIHeads`` with pixel-aligned mask targets cut from the matched instances only.

Two changes to how torchvision trains the mask head; inference is torchvision's own code.

Pixel-aligned targets. torchvision samples a proposal's 28×28 mask target with
``roi_align(..., aligned=False)``, which reads pixel ``k`` as if its centre were at ``k``, while
boxes (``x1`` = last pixel + 1) and the paste of predicted masks into the image (bilinear,
``align_corners=False``) put it at ``k + 0.5``. The targets are therefore half a pixel off the
frame the predictions are pasted in: a perfect mask head reproduces a ground-truth nucleus of
~16 px shifted by −0.35 px in x and y and 6 % larger (mean IoU 0.90 with the original on
MoNuSeg's liver image, against 0.95 with ``aligned=True``; tests/test_models.py measures the
round trip). A model learns the targets it is given, so that bias caps every prediction's IoU,
which costs most where small objects are scored at IoU 0.75–0.95 (the DSB/Sartorius score).
The targets here are sampled with ``aligned=True``, the convention of the paste (and of
Detectron2's ROIAlignV2).

Matched instances only. torchvision converts the whole ``N×H×W`` ground-truth stack of an image
to float before sampling it: on a dense 1000×1000 image with 1,862 nuclei that is a 7.4 GB copy
per image per step, although at most ``box_batch_size_per_image × positive_fraction`` (32 by
default) instances have a positive proposal. After the proposals are sampled, only the instances
some positive proposal is matched to are kept, and the matches renumbered to that short stack.

The training forward pass is written here (box branch through torchvision's ``fastrcnn_loss``,
the mask branch with the targets above); the inference pass is ``RoIHeads.forward`` itself.
TorchScript cannot compile ``super()``: the export scripts torchvision's class
(``models.zoo.with_torchvision_classes``), which holds the same state and infers the same way.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

from models.pooling import pool_masks


def aligned_mask_targets(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, size: int) -> Tensor:
    """``size×size`` float targets: ``gt_masks[matched_idxs[i]]`` sampled over ``boxes[i]``
    (image pixels, xyxy) with pixel ``k`` centred at ``k + 0.5``, as boxes and the paste read it
    (``roi_align(..., aligned=True)``, gathering only the pixels read: ``models.pooling.pool_masks``)."""
    rois = torch.cat([matched_idxs[:, None].to(boxes), boxes], dim=1)
    return pool_masks(gt_masks, rois, size).to(boxes.dtype)


def mask_loss(mask_logits: Tensor, proposals: List[Tensor], gt_masks: List[Tensor], gt_labels: List[Tensor],
              matched_idxs: List[Tensor]) -> Tensor:
    """Binary cross-entropy of each positive proposal's mask logits for its object's class against
    the pixel-aligned target of its matched object (``aligned_mask_targets``)."""
    size = mask_logits.shape[-1]
    labels = torch.cat([gl[idx] for gl, idx in zip(gt_labels, matched_idxs)])
    targets = torch.cat([aligned_mask_targets(m, p, i, size) for m, p, i in zip(gt_masks, proposals, matched_idxs)])
    if targets.numel() == 0:       # no positive proposal in the batch: a zero that keeps the graph
        return mask_logits.sum() * 0
    logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(logits, targets)


class MatchedMaskRoIHeads(RoIHeads):
    """``RoIHeads`` trained with pixel-aligned mask targets from the matched instances only."""

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("targets are needed in training mode")
        if self.has_keypoint():
            raise NotImplementedError("MatchedMaskRoIHeads trains boxes and masks, not keypoints")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if self.has_mask():
            positive = [torch.nonzero(image_labels > 0)[:, 0] for image_labels in labels]
            mask_proposals = [p[pos] for p, pos in zip(proposals, positive)]
            pos_matched_idxs = [m[pos] for m, pos in zip(matched_idxs, positive)]
            mask_features = self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
            mask_logits = self.mask_predictor(mask_features)
            losses["loss_mask"] = mask_loss(mask_logits, mask_proposals, [t["masks"] for t in targets],
                                            [t["labels"] for t in targets], pos_matched_idxs)
        return [], losses

    def select_training_samples(self, proposals: List[Tensor], targets: Optional[List[Dict[str, Tensor]]]
                                ) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(proposals, targets)
        if targets is not None and self.has_mask():
            # The mask loss reads ``targets[i]["masks"]`` and ``["labels"]`` only, indexed by the
            # positive proposals' matches; box targets are final at this point. The dicts are
            # the model transform's per-step copies, never the caller's.
            for target, matches, proposal_labels in zip(targets, matched_idxs, labels):
                positive = proposal_labels > 0
                used, renumbered = torch.unique(matches[positive], return_inverse=True)
                target["masks"] = target["masks"][used]
                target["labels"] = target["labels"][used]
                matches[positive] = renumbered
        return proposals, matched_idxs, labels, regression_targets


def use_matched_mask_targets(roi_heads: RoIHeads) -> RoIHeads:
    """Switch a built ``RoIHeads`` to ``MatchedMaskRoIHeads`` in place (no new state: only the
    training pass differs, so weights and state dicts are unchanged)."""
    roi_heads.__class__ = MatchedMaskRoIHeads
    return roi_heads
