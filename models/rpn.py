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

In eval mode the test-time caps (proposals kept per FPN level before NMS, and in all after) can
follow the input's area (``test_pixels``, ``ModelOptions.rpn_test_pixels``): the caps the data
chose for a median training image would otherwise bind harder on a larger input — a whole
image shown at a larger test scale, or a large image predicted whole — and less on a tile, so
tiles found 3 % more MoNuSeg nuclei than the whole images they cover.

TorchScript export switches the RPN back to torchvision's class (``models.zoo.with_torchvision_classes``).
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

CHUNK_ELEMENTS = 1 << 22     # IoUs per block: 16 MB of float32
MIN_TEST_TOP_N = 1000        # torchvision's test caps: the fewest a small input keeps when caps follow the area


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


def area_cap(cap: int, pixels: int, test_pixels: Optional[int]) -> int:
    """A test-time cap chosen for inputs of ``test_pixels`` model pixels, for an input of ``pixels``:
    proportional to the area (the same proposals per object), at least ``MIN_TEST_TOP_N`` (or the
    cap, if smaller). ``test_pixels`` ``None``: the cap as it is, per input (torchvision's)."""
    if test_pixels is None:
        return cap
    return max(min(cap, MIN_TEST_TOP_N), int(math.ceil(cap * pixels / test_pixels)))


class ChunkedMatchingRPN(RegionProposalNetwork):
    """``RegionProposalNetwork`` whose training targets come from ``match_anchors``, and whose
    test-time caps follow the input's area when ``test_pixels`` is set (``area_cap``)."""

    test_pixels: Optional[int] = None       # model-input pixels the test caps are for; None: per input
    _input_pixels: Optional[int] = None     # the batch being filtered (eval mode), height × width

    def pre_nms_top_n(self) -> int:
        cap = super().pre_nms_top_n()
        return cap if self._input_pixels is None else area_cap(cap, self._input_pixels, self.test_pixels)

    def post_nms_top_n(self) -> int:
        cap = super().post_nms_top_n()
        return cap if self._input_pixels is None else area_cap(cap, self._input_pixels, self.test_pixels)

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: List[Tuple[int, int]],
                         num_anchors_per_level: List[int]) -> Tuple[List[Tensor], List[Tensor]]:
        if self.training or self.test_pixels is None:
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        # The batch's padded canvas: every image's anchors cover it.
        self._input_pixels = max(h for h, _ in image_shapes) * max(w for _, w in image_shapes)
        try:
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        finally:
            self._input_pixels = None

    def fix_test_caps(self, pixels: int) -> None:
        """Make the test caps those of an input of ``pixels`` for every input (exported models)."""
        for caps in (self._pre_nms_top_n, self._post_nms_top_n):
            caps["testing"] = area_cap(caps["testing"], pixels, self.test_pixels)
        self.test_pixels = None

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


def use_chunked_anchor_matching(rpn: RegionProposalNetwork, test_pixels: Optional[int] = None) -> RegionProposalNetwork:
    """Switch a built RPN to ``ChunkedMatchingRPN`` in place (no new weights); ``test_pixels``:
    the model-input area its test caps are for (``None``: per input)."""
    rpn.__class__ = ChunkedMatchingRPN
    rpn.test_pixels = test_pixels
    return rpn
