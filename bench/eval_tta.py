"""Effect of flip TTA (weighted segments fusion) on a checkpoint's validation scores.

Predicts the validation split of the checkpoint's dataset (built-in synthetic by default) with
and without ``--tta`` through the same code predict.py uses, then scores both with
``metrics.evaluate_predictions`` (COCO segm/bbox AP and the Sartorius score).

    python bench/eval_tta.py --checkpoint runs/NAME/best.pth
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main() -> None:
    from datasets import build_dataset
    from engine.checkpoint import build_model_from_checkpoint, load_checkpoint
    from engine.evaluation import headline
    from metrics import evaluate_predictions
    from transforms.presets import build_transforms

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()

    state = load_checkpoint(args.checkpoint)
    model, config = build_model_from_checkpoint(state)
    model.eval()
    dataset = build_dataset(config.dataset, "val", {**config.dataset_options, "data_path": config.data_path},
                            build_transforms("none", train=False))
    gt = dataset.coco_gt()
    print(f"{args.checkpoint}: {config.model}, {len(dataset)} {config.dataset} validation images, "
          f"max dets {config.detections_per_img}")
    for tta in (False, True):
        start = time.perf_counter()
        per_image = predict_split(model, dataset, tta, args.batch_size)
        results = [r for image_results in per_image.values() for r in image_results]
        seconds = time.perf_counter() - start
        report = evaluate_predictions(gt, results, config.detections_per_img, class_names=dataset.class_names,
                                      sartorius_score_thresh=config.sartorius_score_thresh)
        flat = headline(report)
        print(f"tta={'on ' if tta else 'off'}  " + "  ".join(f"{k} {v:.4f}" for k, v in flat.items())
              + f"  ({seconds:.0f} s)")


def predict_split(model, dataset, tta: bool, batch_size: int) -> dict:
    """COCO results of every image of ``dataset`` through predict.py's path, keyed by image id."""
    from engine.predictor import predict_instances

    per_image = {}
    for first in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(first, min(first + batch_size, len(dataset)))]
        instances = predict_instances(model, [image for image, _ in items], torch.device("cpu"), False, tta, 0.5)
        for (_, target), inst in zip(items, instances):
            per_image[target["image_id"]] = inst.to_coco_results(target["image_id"])
    return per_image


if __name__ == "__main__":
    main()
