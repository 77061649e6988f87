"""RoIAlign for training on CPU: a weighted gather of channel rows and its scatter-add.

torchvision's CPU ``roi_align`` works on NCHW features one channel at a time, and its backward
adds every output element's four bilinear corners into the gradient one number at a time. On a
MoNuSeg training step (512² crops, 128-channel R18-FPN, bf16 autocast, channels-last features;
256 box RoIs at 7×7 and 64 mask RoIs at 14×14) the two poolers cost about 290 ms of a 0.88 s
step: 170 ms of backward, and forwards that first copy each feature level to NCHW.

What RoIAlign computes is a fixed sparse linear map: each output bin is a weighted sum of
``(2·sampling_ratio)²`` feature pixels (each sample's bilinear corners), with pixels and weights
that depend only on the RoI. ``_taps`` computes them once per bin, not per channel;
the forward is then ``embedding_bag`` over the (N·H·W, C) rows of the features (a view when
they are channels-last, as ``models.zoo`` builds every model) and the backward ``index_add_`` of
the weighted gradient rows, channels-last again: 1.3 ms and 13 ms per pooler instead of about
30 ms and 85 ms, equal to torchvision's to float rounding (tests/test_models.py).

Only while a gradient is recorded on CPU with a fixed ``sampling_ratio`` (torchvision's poolers
use 2): inference, CUDA, adaptive sampling, tracing and scripting run torchvision's own code, so
every prediction is unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def _sample_axis(start: Tensor, length: Tensor, pooled: int, ratio: int, size: int):
    """Along one axis, for every RoI (rows) and sample (``pooled * ratio`` columns): the low and
    high neighbouring pixel and their bilinear weights, exactly as torchvision's CPU kernel
    places the samples (a sample more than one pixel outside the map contributes nothing; one
    at or past the last pixel reads the last pixel)."""
    bin_size = length / pooled
    k = torch.arange(pooled * ratio, dtype=start.dtype, device=start.device)
    pos = start[:, None] + (k // ratio)[None] * bin_size[:, None] + ((k % ratio) + 0.5)[None] * (bin_size / ratio)[:, None]
    inside = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low)
    return low, high, (1 - frac) * inside, frac * inside


def _taps(shape: tuple[int, ...], rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
          sampling: tuple[int, int], aligned: bool) -> tuple[Tensor, Tensor]:
    """For every output bin (row: RoI-major, then bin row and column) the feature pixels it reads
    (flat indices into the N·H·W pixels of ``shape`` (N, C, H, W), ``4·sy·sx`` per bin for
    ``sampling`` = (sy, sx) samples per bin) and their weights: bilinear weight / samples per
    bin, 0 for samples outside the map."""
    n, _, h, w = shape
    ph, pw = output_size
    sy, sx = sampling
    k = rois.shape[0]
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:   # torchvision's legacy mode makes every RoI at least one pixel
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    y_low, y_high, wy_low, wy_high = _sample_axis(y1, roi_h, ph, sy, h)
    x_low, x_high, wx_low, wx_high = _sample_axis(x1, roi_w, pw, sx, w)
    rows = torch.stack([y_low, y_high], -1).view(k, ph, 2 * sy)   # each sample's low and high pixel
    row_weights = torch.stack([wy_low, wy_high], -1).view(k, ph, 2 * sy)
    cols = torch.stack([x_low, x_high], -1).view(k, pw, 2 * sx)
    col_weights = torch.stack([wx_low, wx_high], -1).view(k, pw, 2 * sx)
    image = rois[:, 0].long()
    pixel = ((image[:, None, None, None, None] * h + rows[:, :, None, :, None]) * w
             + cols[:, None, :, None, :]).reshape(k * ph * pw, 4 * sy * sx)
    weight = ((row_weights[:, :, None, :, None] * col_weights[:, None, :, None, :])
              / (sy * sx)).reshape(k * ph * pw, 4 * sy * sx)
    return pixel, weight


# Samples per bin (sy·sx) above which ``pool_masks`` copies the RoIs' masks to float for
# ``roi_align`` instead of gathering: the taps grow with the square of the object's size (16
# RoIs of ~600 px: 0.6 s and 436 MB of indices and weights, against 0.07 s).
MAX_GATHER_SAMPLES = 4


def pool_masks(masks: Tensor, rois: Tensor, size: int) -> Tensor:
    """``roi_align(masks[:, None].float(), rois, (size, size), 1.0, -1, aligned=True)[:, 0]``
    (torchvision's adaptive sampling: ``ceil(roi side / size)`` samples per bin and axis) without
    the float copy of all of ``masks`` (N, H, W), any dtype. On CPU the bins of RoIs up to
    ``2·size`` px gather only the pixels they read; larger RoIs (few, in cell images) are sampled
    from a float copy of their own masks. For the mask head's training targets, where the copy of
    a crop's matched instances cost more than the targets (31 × 512² floats: 47 ms, 64 targets
    of 28²)."""
    if masks.device.type != "cpu":
        return roi_align(masks[:, None].float(), rois.float(), (size, size), 1.0, -1, True)[:, 0]
    n, h, w = masks.shape
    out = torch.zeros(rois.shape[0], size * size, dtype=torch.float32, device=masks.device)
    if rois.shape[0] == 0:
        return out.view(0, size, size)
    rois = rois.float()
    grid_h = torch.ceil((rois[:, 4] - rois[:, 2]) / size).long()
    grid_w = torch.ceil((rois[:, 3] - rois[:, 1]) / size).long()
    flat = masks.reshape(-1)
    for sy, sx in torch.unique(torch.stack([grid_h, grid_w], 1), dim=0).tolist():
        if sy <= 0 or sx <= 0:   # an empty RoI reads nothing (torchvision: zero samples, value 0)
            continue
        index = torch.nonzero((grid_h == sy) & (grid_w == sx))[:, 0]
        if sy * sx > MAX_GATHER_SAMPLES:
            used, renumbered = torch.unique(rois[index, 0].long(), return_inverse=True)
            local = torch.cat([renumbered[:, None].float(), rois[index, 1:]], 1)
            pooled = roi_align(masks[used][:, None].float(), local, (size, size), 1.0, -1, True)
            out[index] = pooled.view(index.shape[0], size * size)
            continue
        pixel, weight = _taps((n, 1, h, w), rois[index], (size, size), 1.0, (sy, sx), True)
        out[index] = (flat[pixel].float() * weight).sum(1).view(index.shape[0], size * size)
    return out.view(-1, size, size)


class _RoIAlign(torch.autograd.Function):
    """RoIAlign on fp32 features as a weighted gather of channel rows (forward) and the matching
    scatter-add (backward); the gradient comes back channels-last, as the convolutions want it."""

    @staticmethod
    def forward(ctx, features: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                sampling_ratio: int, aligned: bool) -> Tensor:
        n, c, h, w = features.shape
        k = rois.shape[0]
        pixel, weight = _taps(features.shape, rois, output_size, spatial_scale, (sampling_ratio,) * 2, aligned)
        ctx.save_for_backward(pixel, weight)
        ctx.shape = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(n * h * w, c)   # a view for channels-last features
        pooled = F.embedding_bag(pixel, rows, per_sample_weights=weight.to(rows.dtype), mode="sum")
        return pooled.view(k, *output_size, c).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pixel, weight = ctx.saved_tensors
        n, c, h, w = ctx.shape
        grad_rows = grad.permute(0, 2, 3, 1).reshape(pixel.shape[0], c)
        weight = weight.to(grad.dtype)
        grad_input = grad.new_zeros((n * h * w, c))
        for tap in range(pixel.shape[1]):
            grad_input.index_add_(0, pixel[:, tap], grad_rows * weight[:, tap, None])
        return grad_input.view(n, h, w, c).permute(0, 3, 1, 2), None, None, None, None, None


def roi_align_gather(features: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                     sampling_ratio: int, aligned: bool = False) -> Tensor:
    """``torchvision.ops.roi_align`` (rois as (K, 5) with the image index first), as ``_RoIAlign``
    when it records a gradient on CPU with a fixed ``sampling_ratio``, else torchvision's. Like
    torchvision's under autocast, it samples in fp32 and returns the features' dtype."""
    if (features.device.type != "cpu" or sampling_ratio <= 0 or rois.shape[0] == 0
            or not (torch.is_grad_enabled() and features.requires_grad)):
        return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    pooled = _RoIAlign.apply(features.float(), rois.float(), tuple(output_size), float(spatial_scale),
                             int(sampling_ratio), bool(aligned))
    return pooled.to(features.dtype)


class GatherMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same levels, scales and outputs) whose per-level
    pooling is ``roi_align_gather`` while gradients are recorded on CPU. Holds no state
    of its own: ``models.zoo.with_torchvision_classes`` switches it back for TorchScript."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        if (not torch.is_grad_enabled() or features[0].device.type != "cpu" or torchvision._is_tracing()
                or torch.jit.is_scripting()):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        size = tuple(self.output_size)
        if len(features) == 1:
            return roi_align_gather(features[0], rois, size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        result = features[0].new_zeros((rois.shape[0], features[0].shape[1], *size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            pooled = roi_align_gather(feature, rois[index], size, scale, self.sampling_ratio)
            result[index] = pooled.to(result.dtype)
        return result


def use_gather_roi_align(roi_heads) -> None:
    """Give the box and mask poolers of built RoI heads ``GatherMultiScaleRoIAlign``."""
    for pooler in (roi_heads.box_roi_pool, roi_heads.mask_roi_pool):
        if type(pooler) is MultiScaleRoIAlign:
            pooler.__class__ = GatherMultiScaleRoIAlign
