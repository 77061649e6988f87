"""torchvision's ``RegionProposalNetwork`` with the anchor matching done a few objects at a time.

To label anchors in training, torchvision computes the IoU of every ground-truth box with every
anchor as one ``objects × anchors`` matrix (and ``box_iou``'s intermediates are twice that):
for the two densest MoNuSeg images at 500² (1,862 and 1,584 nuclei, 63k anchors each) that is
~0.5 GB per tensor, and filling and reducing it took more time than the network itself
(bench/bench_dense_step.py). ``match_anchors`` computes the same matches band by band: objects
sorted by their top edge, a few at a time (``CHUNK_ELEMENTS`` IoUs at most), each against only
the anchors reaching into the band's rows; per anchor the best object (ties to the lower index,
as ``torch.max``), per object its best IoU, then the low-quality matches (every anchor that
reaches an object's best IoU keeps its best object) in a second pass. IoUs are computed element
by element by ``box_iou`` either way, so labels and matched boxes are bit for bit torchvision's
(tests/test_models.py compares them).

TorchScript export switches the RPN back to torchvision's class (``models.zoo.with_torchvision_classes``).
"""

from typing import Dict, List, Tuple

import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

CHUNK_ELEMENTS = 1 << 22     # IoUs per block: 16 MB of float32


def match_anchors(gt_boxes: Tensor, anchors: Tensor, matcher: Matcher, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """``matcher(box_iou(gt_boxes, anchors))`` without the full matrix: the matched object per
    anchor, or ``Matcher.BELOW_LOW_THRESHOLD`` / ``BETWEEN_THRESHOLDS``.

    Objects are taken in bands of rows (sorted by their top edge), and each band's IoUs are
    computed only with the anchors that reach into its rows: an anchor outside has IoU 0 with
    all of them, which changes neither an anchor's best object (ties go to the lowest index, as
    ``torch.max`` gives) nor an object's best IoU (positive for any real box)."""
    count, num_anchors = gt_boxes.shape[0], anchors.shape[0]
    step = max(1, chunk_elements // max(1, num_anchors))
    dtype = torch.promote_types(gt_boxes.dtype, anchors.dtype)
    best = torch.zeros(num_anchors, dtype=dtype, device=anchors.device)
    best_object = torch.zeros(num_anchors, dtype=torch.int64, device=anchors.device)
    object_best = torch.zeros(count, dtype=dtype, device=anchors.device)
    bands = []
    for band in torch.argsort(gt_boxes[:, 1], stable=True).split(step):
        band = band.sort().values      # index order inside a band: torch.max's first max is the lowest index
        boxes = gt_boxes[band]
        near = torch.nonzero((anchors[:, 3] > boxes[:, 1].min()) & (anchors[:, 1] < boxes[:, 3].max()))[:, 0]
        iou = box_iou(boxes, anchors[near])
        if iou.numel():
            values, objects = iou.max(dim=0)
            objects = band[objects]
            current, current_object = best[near], best_object[near]
            better = (values > current) | ((values == current) & (objects < current_object))
            best[near] = torch.where(better, values, current)
            best_object[near] = torch.where(better, objects, current_object)
            object_best[band] = iou.max(dim=1).values
        bands.append((band, near))
    if not bool((object_best > 0).all()):    # a box without area: the full matrix decides its ties
        return matcher(box_iou(gt_boxes, anchors))
    matches = best_object.clone()
    matches[best < matcher.low_threshold] = matcher.BELOW_LOW_THRESHOLD
    matches[(best >= matcher.low_threshold) & (best < matcher.high_threshold)] = matcher.BETWEEN_THRESHOLDS
    if matcher.allow_low_quality_matches:
        for band, near in bands:
            iou = box_iou(gt_boxes[band], anchors[near])
            reached = near[(iou == object_best[band, None]).any(dim=0)]
            matches[reached] = best_object[reached]
    return matches


class ChunkedMatchingRPN(RegionProposalNetwork):
    """``RegionProposalNetwork`` whose training targets come from ``match_anchors``."""

    def assign_targets_to_anchors(self, anchors: List[Tensor], targets: List[Dict[str, Tensor]]
                                  ) -> Tuple[List[Tensor], List[Tensor]]:
        labels, matched_gt_boxes = [], []
        for anchors_per_image, target in zip(anchors, targets):
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:   # a background image: every anchor negative
                matched_gt_boxes.append(torch.zeros(anchors_per_image.shape, dtype=torch.float32,
                                                    device=anchors_per_image.device))
                labels.append(torch.zeros(anchors_per_image.shape[0], dtype=torch.float32,
                                          device=anchors_per_image.device))
                continue
            matches = match_anchors(gt_boxes, anchors_per_image, self.proposal_matcher)
            matched_gt_boxes.append(gt_boxes[matches.clamp(min=0)])
            image_labels = (matches >= 0).to(torch.float32)     # BELOW_LOW_THRESHOLD: 0, background
            image_labels[matches == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(image_labels)
        return labels, matched_gt_boxes


def use_chunked_anchor_matching(rpn: RegionProposalNetwork) -> RegionProposalNetwork:
    """Switch a built RPN to ``ChunkedMatchingRPN`` in place (no new state)."""
    rpn.__class__ = ChunkedMatchingRPN
    return rpn
