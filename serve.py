"""A web page for the model: drop images in a browser, see and download the segmentation.

    python serve.py [--checkpoint PATH] [--host 127.0.0.1] [--port 8000] [--device auto]

Without ``--checkpoint`` the newest ``best.pth`` under ``runs/`` is used (else the newest
``last.pth``), as predict.py does. The model is loaded once; uploads go through a bounded
queue (``--queue-size`` requests at a time, ``--batch-size`` images in the model at once).
The page and everything it loads is served by this process: it works without internet.
Binds 127.0.0.1 unless ``--host`` says otherwise (with a warning: anyone who can reach the
port can use the model). Exit status 2: nothing could be served (no checkpoint, bad flag,
port in use).
"""
from __future__ import annotations

import argparse
import socket
import sys

DEFAULT_PORT = 8000


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Serve the model as a web page (upload images, see and "
                                                 "download the segmentation).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint file or run folder (default: newest best.pth under --runs-dir)")
    parser.add_argument("--runs-dir", default="runs", help="where training writes runs; searched without --checkpoint")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; anything but loopback exposes the page to the network")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free port)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="the score slider's starting value")
    parser.add_argument("--mask-thresh", type=float, default=0.5, help="mask probability threshold")
    parser.add_argument("--detections-per-img", type=int, default=None,
                        help="override the checkpoint's cap on detections per image")
    parser.add_argument("--batch-size", type=int, default=1, help="images in the model at once")
    parser.add_argument("--queue-size", type=int, default=64,
                        help="requests admitted at once (uploading, waiting or predicting); more get 503")
    parser.add_argument("--max-upload-mb", type=float, default=64, help="largest upload accepted")
    parser.add_argument("--max-pixels", type=float, default=64, help="largest image accepted, in megapixels")
    parser.add_argument("--result-memory-mb", type=float, default=1024,
                        help="memory for finished results (the oldest are dropped beyond it)")
    parser.add_argument("--amp", action="store_true", help="mixed precision inference")
    return parser


def check_args(args: argparse.Namespace) -> None:
    from engine.predictor import PredictError

    if not 0 <= args.port <= 65535:
        raise PredictError(f"--port must be in 0..65535, got {args.port}")
    for flag, value in (("--batch-size", args.batch_size), ("--queue-size", args.queue_size)):
        if value < 1:
            raise PredictError(f"{flag} must be ≥ 1, got {value}")
    for flag, value in (("--max-upload-mb", args.max_upload_mb), ("--max-pixels", args.max_pixels),
                        ("--result-memory-mb", args.result_memory_mb)):
        if not value > 0:
            raise PredictError(f"{flag} must be > 0, got {value}")
    if not 0 <= args.score_thresh <= 1 or not 0 < args.mask_thresh < 1:
        raise PredictError("--score-thresh must be in [0, 1] and --mask-thresh in (0, 1)")


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def build_app(args: argparse.Namespace):
    """Flags → (Starlette app, the checkpoint's path). Raises ``PredictError`` with a message."""
    from engine.predictor import Predictor, resolve_checkpoint
    from web.app import create_app
    from web.uploads import Limits

    checkpoint, how = resolve_checkpoint(args.checkpoint, args.runs_dir)
    print(how, file=sys.stderr)
    predictor = Predictor.from_checkpoint(checkpoint, device=args.device, score_thresh=args.score_thresh,
                                          detections_per_img=args.detections_per_img, mask_thresh=args.mask_thresh,
                                          batch_size=args.batch_size, amp=args.amp)
    limits = Limits(max_bytes=int(args.max_upload_mb * 1024 ** 2), max_pixels=int(args.max_pixels * 1e6))
    label = f"{checkpoint.parent.name}/{checkpoint.name}"
    app = create_app(predictor, limits=limits, queue_size=args.queue_size, batch_size=args.batch_size,
                     result_memory=int(args.result_memory_mb * 1024 ** 2), default_score=args.score_thresh,
                     checkpoint_label=label)
    return app, checkpoint


def quiet_decoders() -> None:
    """The page reports a corrupt upload by name; the decoders' own warnings would only repeat it
    on the console (as predict.py silences OpenCV's)."""
    import logging

    import cv2

    logging_api = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_api is not None:
        logging_api.setLogLevel(logging_api.LOG_LEVEL_SILENT)
    logging.getLogger("tifffile").setLevel(logging.ERROR)


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from engine.predictor import PredictError

    quiet_decoders()
    try:
        check_args(args)
        app, _ = build_app(args)
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
            sock.listen(2048)           # connections wait in the backlog until uvicorn accepts them
        except OSError as exc:
            raise PredictError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
                               f"choose another with --port (0: any free port) or --host") from exc
    except PredictError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this machine's port {port} can upload "
              f"images and use the model; there is no login. Use the default --host 127.0.0.1 to keep it local.",
              file=sys.stderr)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    shown = f"[{shown}]" if ":" in shown else shown
    print(f"serving on http://{shown}:{port}/  (Ctrl-C stops)", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
