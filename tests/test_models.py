from __future__ import annotations

import dataclasses
import urllib.error

import pytest
import torch

from models import ModelOptions, WeightsError, build_model, model_names


@pytest.mark.parametrize("name", model_names())
def test_every_variant_builds_with_requested_classes(name):
    model = build_model(name, 3, ModelOptions(detections_per_img=1000, rpn_post_nms_top_n_test=3000))
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    assert model.roi_heads.detections_per_img == 1000 and model.rpn._post_nms_top_n["testing"] == 3000


def test_local_weights_with_other_class_count_reinitialise_heads(tmp_path, caplog):
    source = build_model("maskrcnn_resnet18_fpn", 5)
    path = tmp_path / "w.pth"
    torch.save({"model": source.state_dict()}, path)
    target = build_model("maskrcnn_resnet18_fpn", 2, weights=str(path))
    assert "re-initialised" in caplog.text and "cls_score" in caplog.text
    assert torch.equal(target.backbone.body.conv1.weight, source.backbone.body.conv1.weight)


def test_offline_weight_names_explain_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match="offline") as exc:
        build_model("maskrcnn_resnet50_fpn", 2, weights="DEFAULT")
    assert "TORCH_HOME" in str(exc.value) and "--weights /path" in str(exc.value)
    with pytest.raises(WeightsError, match="no torchvision weights"):
        build_model("maskrcnn_resnet18_fpn", 2, weights="DEFAULT")
    with pytest.raises(WeightsError, match="not found"):
        build_model("maskrcnn_resnet18_fpn", 2, weights="/nowhere/w.pth")


def _dense_targets(generator: torch.Generator, size: int, count: int) -> dict:
    """``count`` random overlapping discs on a ``size²`` canvas, as a training target."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.randint(8, size - 8, (count, 2), generator=generator)
    radii = torch.randint(3, 9, (count,), generator=generator)
    masks = ((yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
             <= radii[:, None, None] ** 2).to(torch.uint8)
    ys, xs = masks.any(2), masks.any(1)
    boxes = torch.stack([xs.float().argmax(1), ys.float().argmax(1),
                         size - xs.flip(1).float().argmax(1), size - ys.flip(1).float().argmax(1)], 1).float()
    return {"boxes": boxes, "labels": torch.randint(1, 3, (count,), generator=generator), "masks": masks}


def test_mask_targets_from_matched_instances_are_torchvisions_sampled_pixel_aligned(monkeypatch):
    """The trainer's RoIHeads hand only the matched instances' masks to the mask loss and sample
    them with ``aligned=True``; every loss is bit for bit that of torchvision's RoIHeads whose
    ``project_masks_on_boxes`` samples the full ground-truth stack the same way, and the box
    losses equal torchvision's unchanged ones."""
    import copy

    import torchvision.models.detection.roi_heads as tv_heads

    import models.roi_heads as our_heads

    generator = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 96, 96, generator=generator) for _ in range(3)]
    targets = [_dense_targets(generator, 96, 60), _dense_targets(generator, 96, 25),
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 96, 96, dtype=torch.uint8)}]
    model = build_model("maskrcnn_resnet18_fpn", 2, ModelOptions(input_scale=1.0, anchor_sizes=(8, 16, 32, 64, 128),
                                                                 box_batch_size_per_image=64))
    assert type(model.roi_heads) is our_heads.MatchedMaskRoIHeads
    reference = copy.deepcopy(model)
    reference.roi_heads.__class__ = tv_heads.RoIHeads

    seen: dict[str, list] = {"ours": [], "aligned torchvision": [], "torchvision": []}
    aligned, original = our_heads.aligned_mask_targets, tv_heads.project_masks_on_boxes

    def recording(function):
        def record(gt_masks, boxes, matched_idxs, size):
            out = function(gt_masks, boxes, matched_idxs, size)
            seen[current].append((len(gt_masks), out))
            return out
        return record

    monkeypatch.setattr(our_heads, "aligned_mask_targets", recording(aligned))
    losses = {}
    for current, net, targets_fn in (("ours", model, None), ("aligned torchvision", reference, aligned),
                                     ("torchvision", reference, original)):
        if targets_fn is not None:
            monkeypatch.setattr(tv_heads, "project_masks_on_boxes", recording(targets_fn))
        net.train()
        torch.manual_seed(0)
        losses[current] = net(images, [dict(t) for t in targets])
    for key, value in losses["aligned torchvision"].items():
        assert torch.equal(losses["ours"][key], value), key
    for key, value in losses["torchvision"].items():
        assert torch.equal(losses["ours"][key], value) is (key != "loss_mask"), key
    assert len(seen["ours"]) == len(seen["aligned torchvision"]) == 3
    for (ours_n, ours), (tv_n, tv), (_, unaligned) in zip(seen["ours"], seen["aligned torchvision"], seen["torchvision"]):
        assert torch.equal(ours, tv)
        assert ours.shape[0] == 0 or (ours.amax() > 0.5 and not torch.equal(ours, unaligned))  # real targets
        assert ours_n <= min(tv_n, ours.shape[0])           # only matched instances reach the float copy
    assert seen["ours"][0][0] < seen["aligned torchvision"][0][0]   # and that is fewer than all of them
    # The caller's targets are not touched.
    assert targets[0]["masks"].shape[0] == 60


def _centroids(masks) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(masks.shape[1]), torch.arange(masks.shape[2]), indexing="ij")
    weights = torch.as_tensor(masks).float()
    area = weights.sum((1, 2))
    return torch.stack([(weights * yy).sum((1, 2)) / area, (weights * xx).sum((1, 2)) / area], 1)


def test_mask_targets_pasted_back_reproduce_the_ground_truth():
    """A perfect mask head predicts its targets: pasted into the image with the predictor's paste,
    the targets of each object's own box must give the object back, neither shifted nor grown.
    torchvision's ``aligned=False`` sampling shifts nucleus-sized objects by a third of a pixel,
    and torchvision's paste (box max edge read as inclusive) grows them."""
    import torchvision.models.detection.roi_heads as tv_heads

    from models.roi_heads import aligned_mask_targets
    from utils.box_masks import paste_masks_in_boxes

    generator = torch.Generator().manual_seed(0)
    target = _dense_targets(generator, 128, 40)
    masks, boxes = target["masks"], target["boxes"]
    index = torch.arange(len(masks))

    def round_trip(sample, paste):
        pasted = paste(sample(masks, boxes, index, 28))
        inter = (pasted.bool() & masks.bool()).sum((1, 2))
        union = (pasted.bool() | masks.bool()).sum((1, 2))
        return (inter / union).mean().item(), (_centroids(pasted) - _centroids(masks)).mean(0)

    def ours(probs):
        return torch.from_numpy(paste_masks_in_boxes(probs, boxes, 128, 128).to_dense())

    def torchvision_paste(probs):
        return tv_heads.paste_masks_in_image(probs[:, None], boxes, (128, 128))[:, 0] > 0.5

    iou, shift = round_trip(aligned_mask_targets, ours)
    assert iou > 0.99 and shift.abs().max() < 0.02, (iou, shift)        # discs of radius 3-8 px
    tv_iou, tv_shift = round_trip(tv_heads.project_masks_on_boxes, ours)
    assert tv_iou < iou - 0.1 and (tv_shift < -0.25).all(), (tv_iou, tv_shift)
    grown_iou, _ = round_trip(aligned_mask_targets, torchvision_paste)
    assert grown_iou < iou - 0.05, grown_iou


def _has_norm(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())


@pytest.mark.parametrize("name, expected", [("maskrcnn_resnet18_fpn", True), ("maskrcnn_resnet50_fpn", False)])
def test_head_norm_defaults_per_variant_and_flag_overrides(name, expected):
    model = build_model(name, 1)
    assert _has_norm(model.backbone.fpn) is expected and _has_norm(model.roi_heads.mask_head) is expected
    flipped = build_model(name, 1, ModelOptions(head_norm="none" if expected else "batch"))
    assert _has_norm(flipped.backbone.fpn) is not expected and _has_norm(flipped.roi_heads.mask_head) is not expected
    with pytest.raises(ValueError, match="--head-norm"):
        build_model(name, 1, ModelOptions(head_norm="group"))


def test_checkpoint_config_from_before_head_norm_rebuilds_its_model():
    """A config stored before --head-norm existed means heads without norm: the model rebuilt from
    it takes the old weights, while today's default for the same model would not."""

    from engine.config import ConfigError, TrainConfig, resolve_config

    old = build_model("maskrcnn_resnet18_fpn", 1, ModelOptions(head_norm="none")).state_dict()
    saved = {k: v for k, v in TrainConfig(model="maskrcnn_resnet18_fpn").to_dict().items() if k != "head_norm"}
    config = TrainConfig.from_dict(saved)
    assert config.head_norm == "none"
    build_model(config.model, 1, config.model_options()).load_state_dict(old)            # strict: same layout
    today = resolve_config({"model": "maskrcnn_resnet18_fpn"}, {})
    assert today.head_norm == "batch"
    with pytest.raises(RuntimeError, match="Missing key"):
        build_model(today.model, 1, today.model_options()).load_state_dict(old)
    with pytest.raises(ConfigError, match="--head-norm none"):
        resolve_config({"model": "maskrcnn_resnet50_fpn_v2", "head_norm": "none"}, {})


def test_rpn_test_caps_follow_the_input_area():
    """With ``rpn_test_pixels`` the caps are for inputs of that many model pixels: a 4× larger input
    keeps 4× the proposals, a smaller one fewer (down to 1000, or the cap if smaller); without it
    every input keeps the caps (torchvision's); training never changes; an exported model's fixed
    caps are those of a median training image at the test scale."""
    from models.rpn import area_cap
    from models.zoo import fix_rpn_test_caps, with_torchvision_classes

    assert area_cap(5600, 2_250_000, 1_000_000) == 12600 and area_cap(5600, 250_000, 1_000_000) == 1400
    assert area_cap(5600, 10, 1_000_000) == 1000 and area_cap(300, 10, 1_000_000) == 300
    assert area_cap(5600, 10, None) == 5600
    torch.manual_seed(0)

    def proposals(model, side: int) -> int:
        kept = []
        handle = model.rpn.register_forward_hook(lambda module, args, out: kept.append(len(out[0][0])))
        with torch.no_grad():
            model([torch.rand(3, side, side)])
        handle.remove()
        return kept[0]

    options = ModelOptions(input_scale=1.0, rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=50,
                           rpn_test_pixels=96 * 96, anchor_sizes=(8, 16, 32, 64, 128))
    model = build_model("maskrcnn_resnet18_fpn", 1, options).eval()
    assert proposals(model, 192) == 200 and proposals(model, 96) == 50 and proposals(model, 64) == 50
    fixed = build_model("maskrcnn_resnet18_fpn", 1, dataclasses.replace(options, rpn_test_pixels=None)).eval()
    fixed.load_state_dict(model.state_dict())
    assert proposals(fixed, 192) == 50
    with_test_scale = build_model("maskrcnn_resnet18_fpn", 1, dataclasses.replace(options, input_scale_test=2.0))
    assert fix_rpn_test_caps(with_test_scale) == 200 and with_test_scale.rpn.test_pixels is None
    assert with_torchvision_classes(model).rpn._post_nms_top_n == {"training": 2000, "testing": 50}


@pytest.mark.parametrize("chunk_elements", [1, 7_000, 1 << 22])
def test_chunked_anchor_matching_equals_torchvisions(chunk_elements, monkeypatch):
    """The RPN's anchor labels and matched boxes, computed a few objects at a time, are bit for bit
    those of torchvision's full IoU matrix: dense boxes, exact duplicates (ties), a background image."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import RegionProposalNetwork

    import models.rpn as rpn_module

    monkeypatch.setattr(rpn_module, "CHUNK_ELEMENTS", chunk_elements)
    model = build_model("maskrcnn_resnet18_fpn", 1, ModelOptions(input_scale=1.0, anchor_sizes=(8, 16, 32, 64, 128)))
    assert type(model.rpn) is rpn_module.ChunkedMatchingRPN
    generator = torch.Generator().manual_seed(5)
    dense = _dense_targets(generator, 128, 150)["boxes"]
    dense = torch.cat([dense, dense[:10]])                 # exact duplicates: IoU ties between objects
    targets = [{"boxes": dense}, {"boxes": torch.zeros(0, 4)}, {"boxes": torch.tensor([[3.0, 4.0, 9.5, 30.0]])}]
    images = ImageList(torch.zeros(3, 3, 128, 128), [(128, 128)] * 3)
    features = [torch.zeros(3, 1, 128 // s, 128 // s) for s in (4, 8, 16, 32, 64)]
    anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 5)(images, features)
    ours = model.rpn.assign_targets_to_anchors(anchors, targets)
    reference = RegionProposalNetwork.assign_targets_to_anchors(model.rpn, anchors, targets)
    for got, expected in zip(ours, reference):
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
    labels = ours[0][0]
    assert (labels == 1).sum() > 150 and (labels == -1).any() and (labels == 0).any()
    # The matched indices too (duplicates make ties: torchvision keeps the lower index).
    from torchvision.ops import box_iou
    matcher = model.rpn.proposal_matcher
    assert torch.equal(rpn_module.match_anchors(dense, anchors[0], matcher, chunk_elements),
                       matcher(box_iou(dense, anchors[0])))


def test_anchors_proposals_and_boxes_stay_float32_under_bf16_autocast():
    """bf16 rounds coordinates of 256-512 px to 2 px: torchvision's anchors (features' dtype) and
    decoded boxes (deltas' dtype) would be bf16 under autocast; ``models.precision`` keeps them fp32.
    Training: finite losses, proposals off the 2-px grid; inference: fp32 boxes with fractions."""
    torch.manual_seed(0)
    model = build_model("maskrcnn_resnet18_fpn", 1, ModelOptions(input_scale=1.0, anchor_sizes=(8, 16, 32, 64, 128)))
    seen = {}
    model.rpn.register_forward_hook(lambda module, args, output: seen.update(proposals=output[0]))
    image = torch.rand(3, 640, 640)
    boxes = torch.tensor([[300.5, 310.0, 314.0, 322.5], [520.0, 530.0, 533.0, 541.0]])
    masks = torch.zeros(2, 640, 640, dtype=torch.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.round().int().tolist()):
        mask[y1:y2, x1:x2] = 1
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([image], [{"boxes": boxes, "labels": torch.ones(2, dtype=torch.int64), "masks": masks}])
    assert all(torch.isfinite(v) for v in losses.values()), losses
    proposals = seen["proposals"][0]
    assert proposals.dtype == torch.float32
    far = proposals[proposals > 300]
    assert far.numel() > 100 and (far % 2 != 0).float().mean() > 0.5   # not on bf16's 2-px grid
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([image])[0]
    assert seen["proposals"][0].dtype == torch.float32 and out["boxes"].dtype == torch.float32


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_gather_equals_torchvisions(aligned):
    """``models.pooling``: torchvision's forward, and a gradient equal to torchvision's CPU kernel
    (to float rounding) for RoIs inside, across and beyond the feature map's edges, in fp32 and
    for bf16 features under autocast."""
    from torchvision.ops import roi_align

    from models.pooling import roi_align_gather

    torch.manual_seed(0)
    features = torch.randn(2, 8, 40, 48)
    corner = torch.rand(60, 2) * torch.tensor([200.0, 170.0]) - 10   # some start left of / above the map
    size = torch.rand(60, 2) * 60 + 0.3                               # tiny to larger than the map's edge
    rois = torch.cat([torch.randint(0, 2, (60, 1)).float(), corner, corner + size], 1)
    for output_size, layout in (((7, 7), torch.contiguous_format), ((14, 14), torch.channels_last), ((3, 5), torch.channels_last)):
        ours = features.clone(memory_format=layout).requires_grad_()
        theirs = features.clone().requires_grad_()
        a = roi_align_gather(ours, rois, output_size, 0.25, 2, aligned)
        b = roi_align(theirs, rois, output_size, 0.25, 2, aligned)
        assert a.grad_fn is not None and b.abs().max() > 0.5
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(b)
        a.backward(grad)
        b.backward(grad)
        assert theirs.grad.abs().max() > 0.1
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-5)
    half = features.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = roi_align_gather(half, rois, (7, 7), 0.25, 2, aligned)
    assert pooled.dtype == torch.bfloat16
    pooled.float().sum().backward()
    reference = features.bfloat16().float().requires_grad_()
    roi_align(reference, rois, (7, 7), 0.25, 2, aligned).sum().backward()
    torch.testing.assert_close(half.grad.float(), reference.grad, rtol=2e-2, atol=2e-2)
    empty = roi_align_gather(features.clone().requires_grad_(), rois[:0], (7, 7), 0.25, 2, aligned)
    assert empty.shape == (0, 8, 7, 7)


def test_models_are_channels_last_and_pool_by_gather_only_while_recording_gradients():
    """Built models are channels-last and their poolers gather in training; inference runs
    torchvision's pooler (identical outputs), and TorchScript gets torchvision's class."""
    from torchvision.ops import MultiScaleRoIAlign

    from models.pooling import GatherMultiScaleRoIAlign
    from models.zoo import with_torchvision_classes

    model = build_model("maskrcnn_resnet18_fpn", 1, ModelOptions(input_scale=1.0))
    assert model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    pooler = model.roi_heads.mask_roi_pool
    assert type(pooler) is GatherMultiScaleRoIAlign
    torch.manual_seed(0)
    features = {name: torch.randn(1, 4, 64 // 2 ** i, 64 // 2 ** i) for i, name in enumerate(["0", "1", "2", "3"])}
    boxes = [torch.tensor([[3.0, 4.0, 40.0, 50.0], [100.0, 90.0, 250.0, 240.0], [10.0, 10.0, 20.0, 16.0]])]
    with torch.no_grad():
        expected = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)(features, boxes, [(256, 256)])
        assert torch.equal(pooler(features, boxes, [(256, 256)]), expected)
    leaves = {k: v.clone().requires_grad_() for k, v in features.items()}
    pooled = pooler(leaves, boxes, [(256, 256)])
    assert pooled.grad_fn is not None
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)
    pooled.sum().backward()
    assert all(leaf.grad is not None for leaf in leaves.values())
    with_torchvision_classes(model)
    assert type(model.roi_heads.mask_roi_pool) is MultiScaleRoIAlign


def test_pool_masks_equals_torchvisions_adaptive_aligned_roi_align():
    """``models.pooling.pool_masks`` (the mask head's targets) gathers from uint8 masks what
    torchvision's ``roi_align(..., sampling_ratio=-1, aligned=True)`` computes from a float copy:
    small RoIs (one sample per bin), large ones (several, different per axis), RoIs at the edges,
    and empty ones."""
    from torchvision.ops import roi_align

    from models.pooling import pool_masks

    torch.manual_seed(1)
    masks = (torch.rand(5, 90, 120) > 0.5).to(torch.uint8)
    corner = torch.rand(80, 2) * torch.tensor([130.0, 100.0]) - 5
    size = torch.rand(80, 2) * torch.tensor([90.0, 70.0]) + 0.5
    boxes = torch.cat([corner, corner + size], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, 120)     # proposals are clipped to the image
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, 90)
    boxes[:3, 2] = boxes[:3, 0]                       # zero width
    rois = torch.cat([torch.randint(0, 5, (80, 1)).float(), boxes], 1)
    for size in (28, 14):
        expected = roi_align(masks[:, None].float(), rois, (size, size), 1.0, -1, True)[:, 0]
        got = pool_masks(masks, rois, size)
        assert got.dtype == torch.float32 and expected.amax() == 1 and (expected[:3] == 0).all()
        grids = torch.ceil((rois[:, 3:5] - rois[:, 1:3]) / size)
        assert grids.max() >= 3 and (grids[:, 0] != grids[:, 1]).any()   # adaptive sampling exercised
        samples = grids.prod(1)
        assert ((samples > 0) & (samples <= 4)).any() and (samples > 4).any()   # gathered, and copied to float
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert pool_masks(masks, rois[:0], 28).shape == (0, 28, 28)
