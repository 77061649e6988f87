"""The web page's server: a Starlette app around one ``Predictor``.

    GET  /                              the page (web/static: HTML, JS, CSS; nothing from outside)
    GET  /api/info                      classes, score range, limits
    POST /api/predict?name=N&tta=0|1    body: the image file's bytes → result summary (JSON)
    GET  /api/results/ID                summary at ?score= (counts per class, instance table)
    GET  /api/results/ID/image.png      what the model saw (after the preprocessing contract)
    GET  /api/results/ID/overlay.png    ?score=&fill=&outline=&text= (no model run)
    GET  /api/results/ID/files/KIND     KIND: overlay.png, labels.png, predictions.json,
                                        submission.csv, instances.csv, zip
    GET  /api/download.zip?ids=A,B      every file of several results, as predict.py writes them

Errors are JSON ``{"error": message}`` with a status saying what kind: 413 too large, 415 not
an image by content, 422 unreadable or corrupt, 404 unknown or expired result, 503 queue full.
"""
from __future__ import annotations

import contextlib
import copy
import math
import shutil
import tempfile
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from utils.image_files import ImageReadError
from utils.writers import encode_png
from web.jobs import InferenceQueue, QueueFull
from web.results import ResultStore, ViewSettings, overlay, summary, write_outputs, write_zip
from web.uploads import SUFFIXES, Limits, UploadError, check_upload, display_name, output_stem, unique_stems

STATIC = Path(__file__).resolve().parent / "static"
SECURITY_HEADERS = [
    # Only the app's own scripts and styles run: a name that slipped through as HTML could not
    # load or execute anything.
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                 b"base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
FILE_KINDS = ("overlay.png", "labels.png", "predictions.json", "submission.csv", "instances.csv", "zip")


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def human_bytes(count: int) -> str:
    return f"{count / 1024 ** 2:.1f} MB" if count >= 1024 ** 2 else f"{count / 1024:.0f} kB"


def parse_flag(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    return value.lower() in ("1", "true", "yes", "on")


class SecurityHeaders:
    """ASGI middleware adding ``SECURITY_HEADERS`` to every HTTP response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + SECURITY_HEADERS}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(predictor, *, limits: Limits = Limits(), queue_size: int = 64, batch_size: int = 1,
               result_memory: int = 1024 ** 3, default_score: float = 0.5, checkpoint_label: str = "",
               temp_root: str | None = None) -> Starlette:
    """The app serving ``predictor`` (an ``engine.predictor.Predictor``, loaded once). A copy
    of it with TTA on shares its model. Uploads are written under a private temporary folder
    (in ``temp_root``), removed after each request and as a whole at shutdown."""
    from engine.inference import unwrap

    tta_predictor = copy.copy(predictor)
    tta_predictor.tta = True
    plain_predictor = copy.copy(predictor)
    plain_predictor.tta = False
    queue = InferenceQueue({False: plain_predictor, True: tta_predictor}, capacity=queue_size, batch_size=batch_size)
    store = ResultStore(result_memory)
    roi_heads = unwrap(predictor.model).roi_heads
    min_score = float(roi_heads.score_thresh)
    state: dict = {}

    def settings_from(request: Request) -> ViewSettings:
        params = request.query_params
        try:
            score = float(params.get("score", default_score))
        except ValueError:
            score = default_score
        score = min(max(score if math.isfinite(score) else default_score, min_score), 1.0)
        return ViewSettings(round(score, 4), parse_flag(params.get("fill"), True),
                            parse_flag(params.get("outline"), True), parse_flag(params.get("text"), False))

    def lookup(request: Request):
        result = store.get(request.path_params["result_id"])
        if result is None:
            return None, error(404, "this result is no longer on the server (it restarted or dropped old "
                                    "results to stay within its memory limit); upload the image again")
        return result, None

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def info(request: Request) -> Response:
        return JSONResponse({
            "class_names": predictor.class_names, "min_score": min_score, "default_score": default_score,
            "max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels, "checkpoint": checkpoint_label,
            "device": str(predictor.device), "batch_size": batch_size, "queue_size": queue_size,
            "detections_per_img": int(roi_heads.detections_per_img),
        })

    async def stats(request: Request) -> Response:
        return JSONResponse({**vars(queue.stats), "results": len(store)})

    async def predict(request: Request) -> Response:
        name = display_name(request.query_params.get("name"))
        tta = parse_flag(request.query_params.get("tta"), False)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_bytes:
            return error(413, f"{name}: {human_bytes(int(declared))} is over this server's upload limit of "
                              f"{human_bytes(limits.max_bytes)} (serve.py --max-upload-mb)")
        try:
            slot = queue.admit()
        except QueueFull as exc:
            return error(503, f"{name}: {exc}", headers={"Retry-After": "2"})
        with slot:
            path = state["tmp"] / f"{uuid.uuid4().hex}.upload"
            try:
                size = 0
                with open(path, "wb") as f:
                    async for chunk in request.stream():
                        size += len(chunk)
                        if size > limits.max_bytes:
                            raise UploadError(f"over this server's upload limit of {human_bytes(limits.max_bytes)} "
                                              f"(serve.py --max-upload-mb)", status=413)
                        f.write(chunk)
                kind, _ = await run_in_threadpool(check_upload, path, limits)
                typed = path.with_suffix(SUFFIXES[kind])   # decode_image chooses its reader by suffix
                path.rename(typed)
                path = typed
                prediction = await queue.predict(path, output_stem(name), tta)
            except ClientDisconnect:
                return error(400, f"{name}: the upload was interrupted")
            except UploadError as exc:
                return error(exc.status, f"{name}: {exc}")
            except ImageReadError as exc:
                return error(422, f"{name}: {exc}")
            except RuntimeError as exc:
                return error(500, f"{name}: {exc}")
            finally:
                path.unlink(missing_ok=True)
        result = store.add(name, output_stem(name), tta, prediction)
        return JSONResponse(await run_in_threadpool(summary, result, settings_from(request)))

    async def result_summary(request: Request) -> Response:
        result, missing = lookup(request)
        if missing:
            return missing
        return JSONResponse(await run_in_threadpool(summary, result, settings_from(request)))

    async def image_png(request: Request) -> Response:
        result, missing = lookup(request)
        if missing:
            return missing
        data = await run_in_threadpool(encode_png, result.prediction.view, result.stem)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    async def overlay_png(request: Request) -> Response:
        result, missing = lookup(request)
        if missing:
            return missing
        settings = settings_from(request)
        data = await run_in_threadpool(lambda: encode_png(overlay(result, settings), result.stem))
        return Response(data, media_type="image/png")

    def download(results: list, settings: ViewSettings, kind: str, zip_name: str) -> Response:
        """Write the results' files with predict.py's writers into a temporary folder and send
        one of them (or all as a zip); the folder is removed once the response is sent."""
        work = Path(tempfile.mkdtemp(prefix="download-", dir=state["tmp"]))
        cleanup = BackgroundTask(shutil.rmtree, work, ignore_errors=True)
        try:
            stems = unique_stems([r.stem for r in results])
            files = write_outputs(results, stems, settings, work)
            if kind == "zip":
                path = write_zip(files, work / zip_name)
            elif kind == "labels.png":                  # .tif above 65535 instances
                path = next(f for f in files if f.name.startswith(f"{stems[0]}_labels."))
            elif kind in ("predictions.json", "submission.csv"):
                path = work / kind
            else:
                path = work / f"{stems[0]}_{kind}"
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return FileResponse(path, filename=path.name, background=cleanup)

    async def result_file(request: Request) -> Response:
        result, missing = lookup(request)
        if missing:
            return missing
        kind = request.path_params["kind"]
        if kind not in FILE_KINDS:
            return error(404, f"no download named {kind!r}; one of: {', '.join(FILE_KINDS)}")
        return await run_in_threadpool(download, [result], settings_from(request), kind, f"{result.stem}.zip")

    async def batch_zip(request: Request) -> Response:
        ids = [i for i in request.query_params.get("ids", "").split(",") if i]
        if not ids:
            return error(400, "no results named: pass ?ids=ID1,ID2")
        results = [store.get(i) for i in ids]
        if any(r is None for r in results):
            return error(404, f"{sum(r is None for r in results)} of these results are no longer on the server; "
                              f"upload those images again")
        return await run_in_threadpool(download, results, settings_from(request), "zip", "segmentation.zip")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["tmp"] = Path(tempfile.mkdtemp(prefix="maskrcnn-serve-", dir=temp_root))
        queue.start()
        try:
            yield
        finally:
            queue.stop()
            shutil.rmtree(state["tmp"], ignore_errors=True)

    app = Starlette(routes=[
        Route("/", index),
        Route("/api/info", info),
        Route("/api/stats", stats),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/results/{result_id}", result_summary),
        Route("/api/results/{result_id}/image.png", image_png),
        Route("/api/results/{result_id}/overlay.png", overlay_png),
        Route("/api/results/{result_id}/files/{kind}", result_file),
        Route("/api/download.zip", batch_zip),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ], lifespan=lifespan)
    app.state.queue, app.state.store, app.state.paths = queue, store, state
    app.add_middleware(SecurityHeaders)
    return app
