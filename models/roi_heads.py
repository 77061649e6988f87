"""torchvision's ``RoIHeads`` with mask targets cut from the matched instances only.

torchvision builds the 28×28 mask targets (``project_masks_on_boxes``) by converting the whole
``N×H×W`` ground-truth stack of an image to float and sampling it with ``roi_align``: on a dense
1000×1000 image with 1,862 nuclei that is a 7.4 GB float copy per image per step, although at
most ``box_batch_size_per_image × positive_fraction`` (32 by default) instances have a positive
proposal. ``MatchedMaskRoIHeads`` keeps, after the proposals are sampled, only the instances some
positive proposal is matched to, and renumbers the matches to that short stack. ``roi_align``
then reads the same mask pixels for every proposal as before, so the targets and the loss are
bit for bit torchvision's (tests/test_models.py compares them), at the cost of the matched masks.

No ``from __future__ import annotations`` here: TorchScript (tools/export.py) compiles the
signature of the unused training method from real annotations.
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads


class MatchedMaskRoIHeads(RoIHeads):
    """``RoIHeads`` whose training targets carry only the instances the mask loss reads."""

    @torch.jit.unused   # training only; the exported (scripted) inference path never samples
    def select_training_samples(self, proposals: List[Tensor], targets: Optional[List[Dict[str, Tensor]]]
                                ) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(proposals, targets)
        if targets is not None and self.has_mask():
            # ``forward`` reads ``targets[i]["masks"]`` and ``["labels"]`` for the mask loss only,
            # indexed by the positive proposals' matches; box targets are final at this point.
            # The dicts are the model transform's per-step copies, never the caller's.
            for target, matches, proposal_labels in zip(targets, matched_idxs, labels):
                positive = proposal_labels > 0
                used, renumbered = torch.unique(matches[positive], return_inverse=True)
                target["masks"] = target["masks"][used]
                target["labels"] = target["labels"][used]
                matches[positive] = renumbered
        return proposals, matched_idxs, labels, regression_targets


def use_matched_mask_targets(roi_heads: RoIHeads) -> RoIHeads:
    """Switch a built ``RoIHeads`` to ``MatchedMaskRoIHeads`` in place (no new state: only
    ``select_training_samples`` differs, so weights and state dicts are unchanged)."""
    roi_heads.__class__ = MatchedMaskRoIHeads
    return roi_heads
