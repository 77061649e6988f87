"""Correctness of tiled prediction: the same checkpoint on whole images and in tiles.

For every image, the final instances (score ≥ ``--score-thresh``, non-overlapping) of whole-image
prediction are the reference; the tiled instances are matched to them one to one by mask IoU
(greedy in descending IoU, IoU ≥ 0.5). Reported per image and in total: instance counts and
their relative difference, the share of reference instances matched, and the mean IoU of the
matches. Targets (issue 12): counts within 1 %, ≥ 98 % matched, mean IoU ≥ 0.95.

    python bench/tiled_vs_whole.py --checkpoint RUN/best.pth --images ../shared/data/monuseg/test/images \\
        --tile 512 --tile-overlap 128
    python bench/tiled_vs_whole.py --checkpoint QUICKSTART/best.pth --synthetic 2 --size 256 --mosaic 4 \\
        --detections-per-img 3000 --rpn-top-n 8000
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def match_label_images(reference: np.ndarray, other: np.ndarray, min_iou: float = 0.5) -> np.ndarray:
    """IoUs of the one-to-one matches (IoU ≥ ``min_iou``) between two label images' instances."""
    n_ref, n_oth = int(reference.max()), int(other.max())
    if n_ref == 0 or n_oth == 0:
        return np.zeros(0)
    pairs = reference.astype(np.int64).ravel() * (n_oth + 1) + other.astype(np.int64).ravel()
    inter = np.bincount(pairs, minlength=(n_ref + 1) * (n_oth + 1)).reshape(n_ref + 1, n_oth + 1)
    area_ref, area_oth = inter.sum(axis=1), inter.sum(axis=0)
    r, o = np.nonzero(inter[1:, 1:])
    r, o = r + 1, o + 1
    iou = inter[r, o] / (area_ref[r] + area_oth[o] - inter[r, o])
    matched, used_r, used_o = [], set(), set()
    for k in np.argsort(-iou, kind="stable"):
        if iou[k] < min_iou:
            break
        if r[k] not in used_r and o[k] not in used_o:
            used_r.add(r[k])
            used_o.add(o[k])
            matched.append(iou[k])
    return np.array(matched)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", help="folder of images")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="instead of --images: N generated validation images (datasets.synthetic), every 2nd dense")
    parser.add_argument("--size", type=int, default=256, help="side of a generated image (cells scale with it)")
    parser.add_argument("--mosaic", type=int, default=4, help="each input is a mosaic of mosaic×mosaic generated images")
    parser.add_argument("--detections-per-img", type=int, default=None, help="override the checkpoint's cap")
    parser.add_argument("--rpn-top-n", type=int, default=None,
                        help="override the RPN's proposals kept per image at test time (before and after NMS): "
                             "a whole image denser than the checkpoint's cap loses cells that tiles find")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--tile-overlap", type=int, default=128)
    parser.add_argument("--score-thresh", type=float, default=0.5)
    args = parser.parse_args()

    from engine.predictor import Predictor

    if not args.images and not args.synthetic:
        parser.error("give --images DIR or --synthetic N")
    whole = Predictor.from_checkpoint(args.checkpoint, device="cpu", score_thresh=args.score_thresh, tile=0,
                                      keep_view=False, detections_per_img=args.detections_per_img)
    if args.rpn_top_n:      # the override is per input, not per area
        whole.model.rpn._pre_nms_top_n["testing"] = whole.model.rpn._post_nms_top_n["testing"] = args.rpn_top_n
        whole.model.rpn.test_pixels = None
    tiled = Predictor(whole.model, whole.contract, whole.class_names, score_thresh=args.score_thresh,
                      tile=args.tile, tile_overlap=args.tile_overlap, keep_view=False)
    per_area = getattr(whole.model.rpn, "test_pixels", None)
    print(f"{args.checkpoint}; tiles {args.tile} px, overlap {args.tile_overlap} px, score ≥ {args.score_thresh}; "
          f"RPN top-n {whole.model.rpn._post_nms_top_n['testing']}"
          f"{f' per {per_area:,} model-input pixels' if per_area else ' per input'}, "
          f"detections per image {whole.model.roi_heads.detections_per_img}")
    print(f"{'image':32s} {'whole':>6s} {'tiled':>6s} {'count Δ':>8s} {'matched':>8s} {'mean IoU':>8s} {'tiles':>5s} "
          f"{'s whole':>7s} {'s tiled':>7s}")
    totals = {"whole": 0, "tiled": 0, "matched": 0, "iou_sum": 0.0}
    if args.synthetic:
        from datasets.synthetic import SyntheticSpec, render_image

        spec = SyntheticSpec(height=args.size, width=args.size, split="val", dense_every=2)
        m = args.mosaic
        inputs, truths = [], {}
        for i in range(args.synthetic):
            parts = [[render_image(spec, (i * m + r) * m + c) for c in range(m)] for r in range(m)]
            inputs.append((f"mosaic{i}", np.block([[p[0] for p in row] for row in parts])))
            truth, offset = [], 0               # ground truth: the images' label images, numbered apart
            for row in parts:
                truth.append([])
                for _, labels, _ in row:
                    truth[-1].append(np.where(labels > 0, labels + offset, 0))
                    offset += int(labels.max())
            truths[f"mosaic{i}"] = np.block(truth)
    else:
        truths = {}
        inputs = [(p.name, p.path) for p in sorted(os.scandir(args.images), key=lambda p: p.name) if p.is_file()]
    for name, source in inputs:
        start = time.perf_counter()
        ref = whole.predict(source)
        ref.name = os.path.splitext(name)[0]
        t_whole = time.perf_counter() - start
        start = time.perf_counter()
        got = tiled.predict(source)
        t_tiled = time.perf_counter() - start
        ious = match_label_images(ref.label_image, got.label_image)
        n_ref, n_got = len(ref), len(got)
        totals["whole"] += n_ref
        totals["tiled"] += n_got
        totals["matched"] += len(ious)
        totals["iou_sum"] += float(ious.sum())
        print(f"{ref.name[:32]:32s} {n_ref:6d} {n_got:6d} {(n_got - n_ref) / max(n_ref, 1):+8.2%} "
              f"{len(ious) / max(n_ref, 1):8.2%} {ious.mean() if len(ious) else float('nan'):8.4f} {got.tiles:5d} "
              f"{t_whole:7.1f} {t_tiled:7.1f}")
        if ref.name in truths:                 # generated images: both against the ground truth
            truth = truths[ref.name]
            n_true = len(np.unique(truth)) - 1
            for what, pred in (("whole", ref), ("tiled", got)):
                tp = len(match_label_images(truth, pred.label_image))
                print(f"  vs ground truth ({n_true} cells), {what}: {tp} found at IoU ≥ 0.5, "
                      f"{len(pred) - tp} false positives")
    n_ref = max(totals["whole"], 1)
    print(f"{'all':32s} {totals['whole']:6d} {totals['tiled']:6d} {(totals['tiled'] - totals['whole']) / n_ref:+8.2%} "
          f"{totals['matched'] / n_ref:8.2%} {totals['iou_sum'] / max(totals['matched'], 1):8.4f}")


if __name__ == "__main__":
    main()
