"""Fold-model ensemble (weighted segments fusion) against each fold model alone, on held-out images.

Predicts a split that no fold trained on with every checkpoint alone and with all of them
fused, through the code predict.py uses (``engine.predictor.predict_instances`` → ``engine.tta``), and scores
each with ``metrics.evaluate_predictions``. The held-out split is the checkpoints' dataset with
its folds switched off (``num_folds=0``): for ``synthetic`` that is the separately generated
validation split; other data gives its held-out set with ``--dataset-option``.

    python tools/cross_validate.py --dataset synthetic ... --name EXP
    python bench/eval_ensemble.py --checkpoint runs/EXP/fold*/best.pth [--tta]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import numpy as np

    from bench.eval_tta import predict_split
    from datasets import build_dataset
    from engine.checkpoint import build_model_from_checkpoint, load_checkpoint
    from engine.evaluation import headline
    from metrics import evaluate_predictions
    from transforms.preprocess import Preprocessing
    from transforms.presets import build_transforms

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True, help="the fold models (two or more)")
    parser.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                        help="options of the held-out split (default: the checkpoints' with num_folds=0)")
    parser.add_argument("--tta", action="store_true", help="fuse flips too (alone and in the ensemble)")
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()

    states = [load_checkpoint(path) for path in args.checkpoint]
    built = [build_model_from_checkpoint(state) for state in states]
    models = [model.eval() for model, _ in built]
    config = built[0][1]
    options = {**config.data_options(), "num_folds": 0}
    options.update(dict(item.split("=", 1) for item in args.dataset_option))
    dataset = build_dataset(config.dataset, "val", options,
                            build_transforms("none", False, Preprocessing.from_config(states[0]["config"])))
    gt = dataset.coco_gt()
    print(f"{len(models)} checkpoints ({config.model}); held-out: {len(dataset)} {config.dataset} images, "
          f"max dets {config.detections_per_img}, Sartorius score at score ≥ {config.sartorius_score_thresh}, "
          f"tta {'on' if args.tta else 'off'}")

    def score(model_or_models) -> tuple[dict, float]:
        start = time.perf_counter()
        per_image = predict_split(model_or_models, dataset, args.tta, args.batch_size)
        seconds = time.perf_counter() - start
        results = [r for image_results in per_image.values() for r in image_results]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*overlapping predicted masks.*")   # raw masks overlap
            report = evaluate_predictions(gt, results, config.detections_per_img, class_names=dataset.class_names,
                                          sartorius_score_thresh=config.sartorius_score_thresh)
        return headline(report), seconds

    def row(label: str, flat: dict, seconds: float) -> None:
        print(f"{label:22}" + "  ".join(f"{k} {v:.4f}" for k, v in flat.items()) + f"  ({seconds:.0f} s)")

    singles = []
    for path, model in zip(args.checkpoint, models):
        flat, seconds = score(model)
        singles.append(flat)
        row(os.path.basename(os.path.dirname(path)) or path, flat, seconds)
    mean = {k: float(np.mean([s[k] for s in singles])) for k in singles[0]}
    std = {k: float(np.std([s[k] for s in singles])) for k in singles[0]}
    print(f"{'mean of singles':22}" + "  ".join(f"{k} {mean[k]:.4f}±{std[k]:.4f}" for k in mean))
    flat, seconds = score(models)
    row(f"fused ({len(models)} models)", flat, seconds)


if __name__ == "__main__":
    main()
