from __future__ import annotations

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
