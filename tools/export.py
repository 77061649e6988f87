"""Export a checkpoint as a self-contained model for deployment without this repository.

    python tools/export.py --checkpoint runs/RUN/best.pth --format torchscript --out model.pt
    python tools/export.py --checkpoint runs/RUN/best.pth --format onnx --out model.onnx

The file takes one float32 ``3×H×W`` image in [0, 1] and returns boxes, scores, labels and
box-frame mask probabilities (``engine/export.py``); ``OUT.json`` beside it records how to make
the input from a stored image (the preprocessing contract), the class names and the outputs.
Running the ONNX file with onnxruntime + numpy only: docs/predict.md. Exit status 2 on bad
input or an export that cannot be done (the message says why).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a checkpoint to TorchScript or ONNX.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    parser.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    parser.add_argument("--out", required=True, help="file to write (OUT.json is written beside it)")
    parser.add_argument("--example-size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"),
                        help="ONNX: size of the random image the model is traced with (height and width stay dynamic)")
    return parser


def main(args: argparse.Namespace) -> int:
    from engine.checkpoint import CheckpointError
    from engine.export import ExportError, export_onnx, export_torchscript
    from engine.predictor import PredictError, checkpoint_file

    try:
        checkpoint = checkpoint_file(args.checkpoint)
        if args.format == "torchscript":
            record = export_torchscript(checkpoint, args.out)
        else:
            record = export_onnx(checkpoint, args.out, tuple(args.example_size))
    except (PredictError, CheckpointError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: --out {args.out}: cannot write ({exc})", file=sys.stderr)
        return 2
    print(f"{args.format} model → {args.out} (record: {args.out}.json; classes {', '.join(record['class_names'])})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
