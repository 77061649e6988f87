#!/usr/bin/env python
"""Sartorius loader speed and memory on a generated CSV of the real size.

    python bench/bench_datasets.py [--work-dir /tmp/bench_sartorius] [--repeats 10]

Generates (once, cached in --work-dir) 606 images of 520×704 and 73,585 rows with the real
per-type image/annotation counts and maxima (shsy5y 155/52,286/max 790, astro 131/10,522/594,
cort 320/10,777/108) and mean cell areas, then measures in this process:
  - index build: reading train.csv, grouping rows by image, folds, PNG header checks
  - RSS: after imports, after building train+val, and the peak
  - loading the 790-instance image (image + uint8 masks + boxes) on one thread, against a
    baseline measured in the same run: decoding each RLE into its own full-size mask and
    stacking them (what most public notebooks do)
  - coco_gt() of the validation fold (compressed RLE for every annotation)
  - a COCO-format dense image (LIVECell-like) decoded to masks, against pycocotools' decode
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

TYPES = {"shsy5y": (155, 52_286, 790), "astro": (131, 10_522, 594), "cort": (320, 10_777, 108)}


def per_image_counts(num_images: int, total: int, maximum: int, rng: np.random.Generator) -> list[int]:
    """``num_images`` counts in 1..maximum summing to ``total``, one of them equal to ``maximum``."""
    weights = rng.gamma(2.0, size=num_images - 1)
    counts = np.clip(np.round(weights / weights.sum() * (total - maximum)), 1, maximum - 1).astype(np.int64)
    diff = total - maximum - int(counts.sum())
    while diff:
        i = int(rng.integers(len(counts)))
        step = 1 if diff > 0 else -1
        if 1 <= counts[i] + step <= maximum - 1:
            counts[i] += step
            diff -= step
    return [maximum] + counts.tolist()


def generate(work_dir: str) -> None:
    from tests.fixtures.data_writers import write_sartorius
    rng = np.random.default_rng(0)
    counts, types = [], []
    for name, (images, num_annotations, maximum) in TYPES.items():
        c = per_image_counts(images, num_annotations, maximum, rng)
        counts += c
        types += [name] * len(c)
    order = rng.permutation(len(counts))
    write_sartorius(work_dir, [counts[i] for i in order], [types[i] for i in order], frames_per_sample=4)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def coco_dense_decode(repeats: int) -> None:
    """A LIVECell-like dense image in COCO format: 500 polygon cells on 520×704."""
    from pycocotools import mask as mask_utils

    from utils.coco_rle import coco_rles_to_masks
    rng = np.random.default_rng(0)
    height, width = 520, 704
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    rles = []
    for _ in range(500):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(5, 12)
        poly = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).reshape(-1).tolist()
        rles.append(mask_utils.merge(mask_utils.frPyObjects([poly], height, width)))
    ours = statistics.median(timed(lambda: coco_rles_to_masks(rles, height, width), repeats))
    base = statistics.median(timed(lambda: np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1)),
                                   max(3, repeats // 3)))
    print(f"COCO-format dense image (500 polygons, 520×704) to uint8 masks: {ours * 1e3:.1f} ms; baseline "
          f"pycocotools decode + transpose {base * 1e3:.1f} ms → {base / ours:.1f}× faster")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/bench_sartorius")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.generate_only:
        generate(args.work_dir)
        return
    if not os.path.exists(os.path.join(args.work_dir, "train.csv")):
        # A child process writes the data, so this process's peak RSS is the loader's alone.
        t = time.perf_counter()
        subprocess.run([sys.executable, os.path.abspath(__file__), "--work-dir", args.work_dir, "--generate-only"],
                       check=True)
        print(f"generated {args.work_dir} in {time.perf_counter() - t:.1f} s")

    import torch

    from datasets import build_dataset
    from transforms import build_transforms
    from utils.kaggle_rle import decode_kaggle_rle

    torch.set_num_threads(1)
    csv_path = os.path.join(args.work_dir, "train.csv")
    print(f"train.csv: {os.path.getsize(csv_path) / 2**20:.1f} MiB")
    base = rss_mb()
    options = {"data_path": args.work_dir, "num_folds": 5, "fold": 0}
    t = time.perf_counter()
    train = build_dataset("sartorius", "train", options)
    t_train = time.perf_counter() - t
    t = time.perf_counter()
    val = build_dataset("sartorius", "val", options)
    t_val = time.perf_counter() - t
    index = train.index
    rows = sum(len(a) for a in index.annotations)
    print(f"images {len(index.names)}, rows kept {rows} ({index.log.summary()}), train {len(train)}, val {len(val)}")
    print(f"index build (CSV + grouping + folds + 606 PNG headers): train split {t_train:.2f} s, "
          f"val split {t_val:.2f} s")
    print(f"RSS after imports {base:.0f} MB, after building both splits {rss_mb():.0f} MB "
          f"(+{rss_mb() - base:.0f} MB), peak {peak_rss_mb():.0f} MB")

    dataset = train if max(len(index.annotations[p]) for p in train.positions) == 790 else val
    i = max(range(len(dataset)), key=lambda j: len(index.annotations[dataset.positions[j]]))
    n = len(index.annotations[dataset.positions[i]])
    p = dataset.positions[i]
    path = index.image_path(p)
    med = statistics.median
    dataset.fill_holes = False
    t = time.perf_counter()
    dataset.load(i)
    first = time.perf_counter() - t
    ours = timed(lambda: dataset.load(i), args.repeats)
    dataset.fill_holes = True
    filled = timed(lambda: dataset.load(i), args.repeats)
    print(f"load one {n}-instance image (image + uint8 masks + boxes, 1 thread): median of {args.repeats} "
          f"{med(ours) * 1e3:.1f} ms (max {max(ours) * 1e3:.1f}); with fill_holes {med(filled) * 1e3:.1f} ms; "
          f"first call {first * 1e3:.0f} ms (first touch of fresh process memory)")
    image, target = dataset.load(i)
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (n, 520, 704)
    del image, target
    cells = build_transforms("cells", train=True)
    torch.manual_seed(0)
    aug = timed(lambda: cells(*dataset.load(i)), args.repeats)
    print(f"  load + 'cells' train transforms (scale-crop 512, flips, rot90, jitter): {med(aug) * 1e3:.1f} ms")
    everyone = list(range(0, len(train), 8))
    def load_all():
        for j in everyone:
            train.load(j)   # discarded at once, as a DataLoader worker hands each sample on

    typical = timed(load_all, 1)[0] / len(everyone)
    print(f"mean load over {len(everyone)} training images (fill_holes on): {typical * 1e3:.1f} ms")
    print(f"RSS now {rss_mb():.0f} MB, peak so far {peak_rss_mb():.0f} MB (the dataset and its loads)")

    def baseline():
        import cv2
        cv2.imread(path, cv2.IMREAD_UNCHANGED)
        return np.stack([decode_kaggle_rle(a, 520, 704) for a in index.annotations[p]])

    naive = timed(baseline, max(3, args.repeats // 3))
    print(f"baseline (one full-size mask per RLE, then np.stack): {med(naive) * 1e3:.1f} ms "
          f"→ ours {med(naive) / med(ours):.1f}× faster")
    t = time.perf_counter()
    gt = val.coco_gt()
    print(f"coco_gt() of val fold 0 ({len(gt['images'])} images, {len(gt['annotations'])} annotations): "
          f"{time.perf_counter() - t:.2f} s")
    coco_dense_decode(args.repeats)
    print(f"final peak RSS {peak_rss_mb():.0f} MB (includes the baseline's stacked copy)")


if __name__ == "__main__":
    main()
