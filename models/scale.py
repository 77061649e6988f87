"""The model's input transform when the input size is a fixed scale factor.

torchvision's ``GeneralizedRCNNTransform`` resizes every input so that its short side is
``min_size``: a 512² training crop is enlarged to 800 while a 1000² test image is shrunk to
800, so objects are twice as large in training as at prediction. ``ScaleTransform`` resizes
every input by the same factor ``scale`` instead (1.0: native pixels), so a crop, a whole image
and a tile show objects at one size. Normalisation, batching and postprocessing are
torchvision's.

Training targets are resized box by box: each instance's mask is resampled (nearest) only
inside its box, into a lazily zeroed array, instead of interpolating the whole ``N×H×W``
stack as float (hundreds of full-size float masks per dense image). At ``scale == 1`` nothing
is resampled at all.
"""

from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from utils.arrays import lazy_zeros, nearest_source_index


def scaled_size(height: int, width: int, scale: float) -> Tuple[int, int]:
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize_instance_masks(masks: np.ndarray, boxes: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """uint8 masks ``N×H×W`` → ``N×out_h×out_w`` (nearest), touching only each instance's box
    (grown by one pixel); pixels outside the boxes are zero."""
    n, h, w = masks.shape
    ys, xs = nearest_source_index(out_h, h), nearest_source_index(out_w, w)
    out = lazy_zeros(n, out_h, out_w)
    for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)):
        bx0, by0 = max(int(np.floor(x0)) - 1, 0), max(int(np.floor(y0)) - 1, 0)
        bx1, by1 = min(int(np.ceil(x1)) + 1, w), min(int(np.ceil(y1)) + 1, h)
        oy0, oy1 = np.searchsorted(ys, [by0, by1])
        ox0, ox1 = np.searchsorted(xs, [bx0, bx1])
        if oy1 > oy0 and ox1 > ox0:
            out[k, oy0:oy1, ox0:ox1] = masks[k][np.ix_(ys[oy0:oy1], xs[ox0:ox1])]
    return out


class ScaleTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` with a fixed resize factor instead of min/max sizes:
    ``scale`` in training, ``test_scale`` (default ``scale``) in eval mode, as Detectron2 has a
    training and a test size. ``object_diameter`` (model pixels), when set, asks
    ``engine.inference.detect`` to resize each image by its own factor, the one that shows its
    objects' median diameter at that size; the transform itself resizes by ``test_scale``."""

    def __init__(self, scale: float, image_mean, image_std, test_scale: Optional[float] = None,
                 object_diameter: Optional[float] = None, **kwargs):
        # min_size/max_size are unused by resize() below; torchvision's code requires them.
        super().__init__(min_size=1, max_size=1, image_mean=image_mean, image_std=image_std, **kwargs)
        self.scale = float(scale)
        self.test_scale = float(scale if test_scale is None else test_scale)
        self.object_diameter = None if object_diameter is None else float(object_diameter)

    def resize(self, image: torch.Tensor,
               target: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        # Typed with typing's names and free of numpy on the image path: TorchScript compiles it
        # (tools/export.py); the target path runs in Python only (training).
        if torchvision._is_tracing():       # ONNX export: sizes stay graph values (dynamic input size)
            return self._resize_traced(image), target
        scale = self.scale if self.training else self.test_scale
        h, w = image.shape[-2], image.shape[-1]
        new_h, new_w = scaled_size(h, w, scale)
        if new_h == h and new_w == w:
            return image, target
        image = F.interpolate(image[None], size=[new_h, new_w], mode="bilinear", align_corners=False,
                              antialias=scale < 1)[0]
        if target is None:
            return image, target
        return image, self._resize_target(target, h, w, new_h, new_w)

    @torch.jit.unused
    def _resize_traced(self, image: torch.Tensor) -> torch.Tensor:
        """``resize`` of the image under the ONNX tracer (an eval-mode model): the same sizes (round
        half to even, as Python's ``round``) computed from the traced shape instead of Python ints."""
        if self.test_scale == 1.0:
            return image
        size = [torch.clamp(torch.round(image.shape[d] * torch.tensor(self.test_scale)), min=1).to(torch.int64)
                for d in (-2, -1)]
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                             antialias=self.test_scale < 1)[0]

    @torch.jit.unused
    def _resize_target(self, target: Dict[str, torch.Tensor], h: int, w: int, new_h: int,
                       new_w: int) -> Dict[str, torch.Tensor]:
        target = dict(target)
        if "masks" in target:
            masks = target["masks"]
            if masks.device.type == "cpu":
                resized = torch.from_numpy(resize_instance_masks(masks.numpy(), target["boxes"].cpu().numpy(),
                                                                 new_h, new_w))
            else:  # on a GPU the dense interpolation is cheap and avoids a host round trip
                resized = F.interpolate(masks[:, None].float(), size=(new_h, new_w), mode="nearest")[:, 0].byte()
            target["masks"] = resized
        target["boxes"] = resize_boxes(target["boxes"], (h, w), (new_h, new_w))
        return target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(scale={self.scale}, test_scale={self.test_scale}, "
                f"object_diameter={self.object_diameter}, mean={self.image_mean}, "
                f"std={self.image_std})")
