"""Benchmark: ``Predictor.predict`` vs a plain torchvision loop, same weights, same run, CPU.

Workload: dense 520×704 images (the Sartorius size) and a model that returns 800 detections
per image (random R18-FPN weights, score threshold 0, 800 detections per image). Both sides
produce the same outputs: a label image (descending score, a higher score wins a pixel) and the
COCO RLE of every detection.

- torchvision: ``model([image])`` per image (its own full-canvas paste, ``N×1×H×W`` float),
  masks ``> 0.5``, label image from the dense stack, ``pycocotools`` RLE of each mask.
- Predictor: ``Predictor.predict(image)`` (``detect`` + box-crop paste), ``label_image``,
  ``to_coco(every_detection=True)``.

Peak memory of a method is the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) over its resident set before the method ran.

    python bench/bench_predict.py                 # 4 images, 800 detections
    python bench/bench_predict.py --images 8 --detections 800 --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def dense_images(count: int, height: int = 520, width: int = 704) -> list[np.ndarray]:
    """uint8 gray images full of small bright blobs (cell-like texture)."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        yy, xx = np.mgrid[:height, :width]
        image = np.zeros((height, width), np.float32)
        for cy, cx, r in zip(rng.uniform(0, height, 300), rng.uniform(0, width, 300), rng.uniform(5, 14, 300)):
            image += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        images.append((np.clip(image / image.max() + rng.normal(0, 0.05, image.shape), 0, 1) * 255).astype(np.uint8))
    return images


def torchvision_loop(model, images: list[torch.Tensor]) -> list[tuple[np.ndarray, list[dict]]]:
    outputs = []
    with torch.inference_mode():
        for image in images:
            out = model([image])[0]                                        # masks N×1×H×W, full canvas
            binary = (out["masks"][:, 0] > 0.5).numpy()
            order = torch.argsort(out["scores"], descending=True).numpy()
            labels = np.zeros(binary.shape[1:], np.uint16)
            for k, i in enumerate(order, start=1):
                labels[binary[i] & (labels == 0)] = k
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
            outputs.append((labels, rles))
            del out, binary
    return outputs


def predictor_loop(predictor, arrays: list[np.ndarray]) -> list[tuple[np.ndarray, list[dict]]]:
    outputs = []
    for array in arrays:
        result = predictor.predict(array)
        outputs.append((result.label_image, result.to_coco(every_detection=True)))
    return outputs


def measure(name: str, fn, *args) -> tuple[float, int, list]:
    before = _status("VmRSS")
    reset_peak()
    start = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - before
    print(f"{name:12s} {seconds:7.2f} s  {len(args[-1]) / seconds:6.3f} images/s  peak +{peak / 2 ** 20:7.0f} MiB",
          flush=True)
    return seconds, peak, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--detections", type=int, default=800)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import models
    from engine.config import TrainConfig
    from engine.predictor import Predictor
    from transforms.preprocess import Preprocessing, to_model_input

    torch.manual_seed(0)
    config = TrainConfig(model="maskrcnn_resnet18_fpn", input_scale=1.0, box_score_thresh=0.0,
                         detections_per_img=args.detections, rpn_pre_nms_top_n_test=3000,
                         rpn_post_nms_top_n_test=3000, intensity="full", channels="gray")
    model = models.build_model(config.model, 2, config.model_options()).eval()
    contract = Preprocessing("full", "gray")
    arrays = dense_images(args.images)
    tensors = [to_model_input(a, contract) for a in arrays]
    predictor = Predictor(model, contract, ["a", "b"], "cpu", score_thresh=0.0, keep_view=False)
    with torch.inference_mode():
        count = len(model([tensors[0]])[0]["scores"])                     # warm-up, and the workload's size
    print(f"{args.images} images 520×704, {count} detections per image, torch threads {torch.get_num_threads()}")
    t_tv, m_tv, ref = measure("torchvision", torchvision_loop, model, tensors)
    t_pr, m_pr, got = measure("Predictor", predictor_loop, predictor, arrays)
    for (labels_ref, rles_ref), (labels, rles) in zip(ref, got):
        assert len(rles_ref) == len(rles)
        assert (labels_ref > 0).sum() == (labels > 0).sum(), "the two label images cover different pixels"
    print(f"Predictor / torchvision: {t_tv / t_pr:.2f}× images/s, {m_pr / max(m_tv, 1):.3f}× peak memory")


if __name__ == "__main__":
    main()
