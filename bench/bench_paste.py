"""Benchmark: mask post-processing of one dense image, box-region paste vs torchvision.

Baseline (measured in the same run): torchvision's ``paste_masks_in_image`` (every 28×28 mask
resized into a full-image float canvas), ``> 0.5``, then one ``pycocotools`` RLE per mask.
Fast path: ``utils.box_masks.paste_masks_in_boxes`` (each mask computed near its own box only,
pixel-aligned), then ``box_masks_to_coco_rle``. Also timed: non-overlapping label image and
Kaggle RLE. The masks are compared too: torchvision's paste reads a box's max edge as inclusive
and comes out about half a pixel larger on each side, so the areas differ by design.

Peak memory of a step is the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs before the step) over its resident set before the step.

    python bench/bench_paste.py                      # 800 detections at 520×704
    python bench/bench_paste.py --detections 2000 --repeat 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402
from torchvision.models.detection.roi_heads import paste_masks_in_image  # noqa: E402

from utils.box_masks import box_masks_to_coco_rle, box_masks_to_kaggle_rles, paste_masks_in_boxes, resolve_overlaps  # noqa: E402
from utils.label_images import box_masks_to_label_image  # noqa: E402


def make_detections(n: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` cell-like detections: boxes 6–60 px inside the image, blob-shaped 28×28 soft masks."""
    g = torch.Generator().manual_seed(seed)
    size = 6 + torch.rand(n, 2, generator=g) * 54
    centre = torch.rand(n, 2, generator=g) * torch.tensor([width, height], dtype=torch.float32)
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    radius = 0.6 + 0.3 * torch.rand(n, 1, 1, generator=g)
    blob = torch.sigmoid((radius - torch.sqrt(xx ** 2 + yy ** 2)) * 12)
    noise = 0.15 * torch.randn(n, 28, 28, generator=g)
    probs = (blob + noise).clamp(0, 1)[:, None]
    scores = torch.rand(n, generator=g)
    return boxes, probs, scores


def torchvision_step(boxes, probs, height, width) -> list[dict]:
    canvas = paste_masks_in_image(probs, boxes, (height, width))          # N×1×H×W float32
    binary = (canvas[:, 0] > 0.5).to(torch.uint8).numpy()
    del canvas
    rles = [mask_utils.encode(np.asfortranarray(m)) for m in binary]
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def fast_step(boxes, probs, height, width) -> list[dict]:
    return box_masks_to_coco_rle(paste_masks_in_boxes(probs, boxes, height, width))


def fast_outputs_step(boxes, probs, scores, height, width):
    masks = paste_masks_in_boxes(probs, boxes, height, width)
    rles = box_masks_to_coco_rle(masks)
    _, resolved = resolve_overlaps(masks, scores.numpy())
    return rles, box_masks_to_label_image(resolved), box_masks_to_kaggle_rles(resolved)


def _status_kib(field: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def measure(fn, repeat: int):
    """(result, median seconds, peak MB over the resident set before the step or None)."""
    times, peak = [], None
    result = None
    for r in range(repeat):
        before = _status_kib("VmRSS")
        reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")               # reset VmHWM to the current RSS
            reset = True
        except OSError:
            pass
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        if reset and before is not None and r == 0:
            peak = (_status_kib("VmHWM") - before) / 1024
    return result, statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detections", type=int, default=800)
    parser.add_argument("--height", type=int, default=520)
    parser.add_argument("--width", type=int, default=704)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    h, w = args.height, args.width
    boxes, probs, scores = make_detections(args.detections, h, w, args.seed)
    print(f"{args.detections} detections at {h}×{w}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeat}")
    fast, t_fast, m_fast = measure(lambda: fast_step(boxes, probs, h, w), args.repeat)
    _, t_all, m_all = measure(lambda: fast_outputs_step(boxes, probs, scores, h, w), args.repeat)
    base, t_base, m_base = measure(lambda: torchvision_step(boxes, probs, h, w), args.repeat)

    iou = np.array([mask_utils.iou([a], [b], [0])[0, 0] for a, b in zip(fast, base)])
    area = np.array([mask_utils.area(a) for a in fast], dtype=float)
    area_tv = np.array([mask_utils.area(b) for b in base], dtype=float)
    kept = area_tv > 0
    fmt = lambda m: "n/a" if m is None else f"{m:.0f} MB"  # noqa: E731
    print(f"torchvision paste + threshold + per-mask RLE : {t_base * 1000:8.1f} ms   peak {fmt(m_base)}")
    print(f"box paste + threshold + RLE (utils.box_masks): {t_fast * 1000:8.1f} ms   peak {fmt(m_fast)}")
    print(f"  + overlap removal, label image, Kaggle RLE : {t_all * 1000:8.1f} ms   peak {fmt(m_all)}")
    print(f"speed-up {t_base / t_fast:.1f}×; masks against torchvision's: mean IoU {iou[kept].mean():.3f}, "
          f"area {area[kept].sum() / area_tv[kept].sum():.3f}× theirs")


if __name__ == "__main__":
    main()
