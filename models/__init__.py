"""``build_model(name, num_classes, options, weights, weights_backbone)`` for every variant."""
from __future__ import annotations

from models.weights import WeightsError, load_matching, read_state_dict
from models.zoo import HEAD_NORMS, ModelOptions, assemble_model, check_model_name, model_names


def build_model(name: str, num_classes: int, options: ModelOptions | None = None,
                weights: str | None = None, weights_backbone: str | None = None,
                pretrained_layout: bool | None = None):
    """A Mask R-CNN ``name`` for ``num_classes`` foreground classes (background is added here).

    ``weights``: full-detector weights (torchvision name or local file); heads whose shape
    differs are re-initialised with a warning. ``weights_backbone``: ImageNet backbone weights
    (torchvision name like ``DEFAULT`` / ``ResNet50_Weights.IMAGENET1K_V1``, or a local file).
    ``pretrained_layout``: build the layout of a pretrained model (frozen BN) without loading
    anything — for rebuilding a checkpoint; defaults to whether weights are given.
    """
    variant = check_model_name(name)
    options = options or ModelOptions()
    model = assemble_model(name, num_classes + 1, options,
                           pretrained=bool(weights or weights_backbone) if pretrained_layout is None else pretrained_layout)
    if weights_backbone:
        enum = f"{variant.backbone.replace('resnet', 'ResNet')}_Weights"
        state = read_state_dict(weights_backbone, enum, "--weights-backbone")
        load_matching(model.backbone.body, state, f"--weights-backbone {weights_backbone}")
    if weights:
        state = read_state_dict(weights, variant.weights_enum, "--weights")
        load_matching(model, state, f"--weights {weights}")
    return model


__all__ = ["HEAD_NORMS", "ModelOptions", "WeightsError", "build_model", "model_names"]
