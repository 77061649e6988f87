"""Where a checkpoint of the built-in synthetic data loses accuracy: dense vs sparse images.

The dense images (every 8th; 250-300 small cells) hold about two thirds of the validation
instances, so they weigh most in COCO AP. This scores them and the other images separately
with the same predictions (predict.py's path, no TTA).

    python bench/eval_by_density.py --checkpoint runs/NAME/best.pth
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from bench.eval_tta import predict_split
    from datasets import build_dataset
    from engine.checkpoint import build_model_from_checkpoint, load_checkpoint
    from engine.evaluation import headline
    from metrics import evaluate_predictions
    from metrics.validation import subset_ground_truth
    from transforms.presets import build_transforms

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    args = parser.parse_args()

    model, config = build_model_from_checkpoint(load_checkpoint(args.checkpoint))
    model.eval()
    if config.dataset != "synthetic":
        parser.error(f"{args.checkpoint} was trained on {config.dataset!r}; this script reads the synthetic split")
    dataset = build_dataset("synthetic", "val", dict(config.dataset_options), build_transforms("none", train=False))
    gt = dataset.coco_gt()
    per_image = predict_split(model, dataset, tta=False, batch_size=2)
    every = dataset.spec.dense_every
    dense = {dataset.image_ids[i] for i in range(len(dataset)) if every and i % every == every - 1}
    for name, ids in (("all", set(per_image)), ("dense", dense), ("sparse", set(per_image) - dense)):
        part = subset_ground_truth(gt, ids)
        report = evaluate_predictions(part, [r for i in ids for r in per_image[i]], config.detections_per_img,
                                      class_names=dataset.class_names,
                                      sartorius_score_thresh=config.sartorius_score_thresh)
        print(f"{name:6s} {len(ids):2d} images {len(part['annotations']):4d} cells  "
              + "  ".join(f"{k} {v:.3f}" for k, v in headline(report).items()))


if __name__ == "__main__":
    main()
