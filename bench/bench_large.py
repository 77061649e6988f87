"""Benchmark: one very large image through predict.py on CPU: time, peak memory, per-tile progress.

Builds a ``--side``×``--side`` gray mosaic of generated images (``datasets.synthetic``, 250 px
each, every 8th dense), writes it as PNG, then runs ``predict.py`` on it in a child process
(automatic tiling: the image is far above the whole-image limit) and reports the child's wall
time and peak resident memory (``ru_maxrss`` of the child alone; the mosaic built here does not
count), the number of instances and the label image written (16-bit PNG, or 32-bit TIFF past
65,535 instances).

    python bench/bench_large.py --checkpoint runs/RUN/best.pth               # 10,000 × 10,000
    python bench/bench_large.py --checkpoint runs/RUN/best.pth --side 3000 --formats labels json csv
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = Path(__file__).resolve().parents[1]


def build_mosaic(path: Path, side: int, cell: int = 250) -> None:
    import cv2
    import numpy as np

    from datasets.synthetic import SyntheticSpec, render_image

    spec = SyntheticSpec(height=cell, width=cell, split="val")
    per_row = -(-side // cell)
    mosaic = np.zeros((side, side), np.uint8)
    for r in range(per_row):
        for c in range(per_row):
            image = render_image(spec, r * per_row + c)[0]
            h, w = min(cell, side - r * cell), min(cell, side - c * cell)
            mosaic[r * cell:r * cell + h, c * cell:c * cell + w] = image[:h, :w]
    if not cv2.imwrite(str(path), mosaic):
        raise OSError(f"cannot write {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--side", type=int, default=10_000)
    parser.add_argument("--work-dir", default=None, help="where the mosaic and outputs go (default: a temp folder)")
    parser.add_argument("--formats", nargs="+", default=["labels", "json"])
    parser.add_argument("--detections-per-img", type=int, default=3000, help="per tile")
    parser.add_argument("--predict-args", nargs=argparse.REMAINDER, default=[], help="more predict.py flags")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_large_"))
    work.mkdir(parents=True, exist_ok=True)
    mosaic = work / f"mosaic{args.side}.png"
    start = time.perf_counter()
    if not mosaic.exists():
        build_mosaic(mosaic, args.side)
    print(f"mosaic {args.side}×{args.side} → {mosaic} ({time.perf_counter() - start:.0f} s)", flush=True)

    command = [sys.executable, str(ROOT / "predict.py"), str(mosaic), "--checkpoint", args.checkpoint,
               "--device", "cpu", "--output-dir", str(work / "out"), "--formats", *args.formats,
               "--detections-per-img", str(args.detections_per_img), *args.predict_args]
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command)                     # progress (per tile) goes to this terminal
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    labels = sorted((work / "out").glob("*_labels.*"))
    count = None
    if (work / "out" / "predictions.json").exists():
        count = len(json.loads((work / "out" / "predictions.json").read_text()))
    print(f"exit {done.returncode}; {seconds / 60:.1f} min; peak RSS {peak / 2 ** 30:.2f} GiB; "
          f"label image {', '.join(p.name for p in labels)}; detections in predictions.json: {count}")


if __name__ == "__main__":
    main()
