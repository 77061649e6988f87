"""``Predictor``: a trained checkpoint as a Python object; images in, instances out.

    >>> predictor = Predictor.from_checkpoint("runs/RUN/best.pth")      # doctest: +SKIP
    >>> result = predictor.predict("cells.png")                          # doctest: +SKIP
    >>> result.label_image, result.to_coco(), result.overlay()           # doctest: +SKIP

Everything goes through the project's one path: the checkpoint's preprocessing contract
(``transforms.preprocess.to_model_input``), the model rebuilt from the checkpoint's config
(``engine.checkpoint.build_model_from_checkpoint``), ``engine.inference.detect`` (masks kept in
their boxes, never ``N×H×W``), flip TTA from ``engine.tta``, and ``utils.box_masks`` /
``utils.writers`` for every output form. predict.py is a thin CLI over this module.

Large images are predicted in overlapping tiles and merged across the seams
(``engine.tiling``): with ``tile=SIZE``, or automatically when the model would see more than
``AUTO_TILE_PIXELS`` pixels (after its input scale).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from engine.evaluation import autocast_context
from engine.inference import OBJECT_SCALE_RANGE, detect, object_scale, test_scale, unwrap
from engine.tiling import merge_tiles, stride_aligned_step, tile_grid
from transforms.preprocess import Preprocessing, intensity_bounds, to_model_input
from utils.box_masks import box_masks_to_coco_rle
from utils.image_files import ImageReadError, decode_image, expand_inputs
from utils.instances import Instances
from utils.io import load_json
from utils.label_images import box_masks_to_label_image
from utils.writers import render_overlay, submission_rows

AUTO_TILE_PIXELS = 2048 * 2048     # model-input pixels above which an image is tiled automatically
DEFAULT_TILE = 1024                # tile side (image pixels) when tiling is automatic or asked without a size
DEFAULT_TILE_OVERLAP = 128         # must exceed the largest object's diameter for seamless merging
VIEW_BAND_ROWS = 1024              # rows converted at a time when building the overlay's view


class PredictError(Exception):
    """A problem that stops prediction before it starts; the message says what to do."""


# ------------------------------------------------------------------------------- set-up


def checkpoint_file(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (its ``best.pth``, else ``last.pth``) → the file."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pth", "last.pth"):
            if (path / name).is_file():
                return path / name
        raise PredictError(f"--checkpoint {path}: folder has no best.pth or last.pth")
    if not path.is_file():
        raise PredictError(f"--checkpoint {path}: no such file")
    return path


def resolve_checkpoint(checkpoint: str | None, runs_dir: str) -> tuple[Path, str]:
    """The checkpoint file to load and a sentence saying how it was chosen."""
    from engine.checkpoint import find_latest

    if checkpoint:
        path = checkpoint_file(checkpoint)
        return path, f"using checkpoint {path}"
    for name in ("best.pth", "last.pth"):
        found = find_latest(runs_dir, name)
        if found is not None:
            return found, f"using checkpoint {found} (newest {name} under {runs_dir}/; choose with --checkpoint)"
    raise PredictError(f"no checkpoint found under {runs_dir}/: train a model first (python train.py) "
                       f"or pass --checkpoint PATH")


def load_postprocess(spec: str | os.PathLike | dict) -> Callable[[list[dict], int, int], list[dict]]:
    """Post-processing parameters (the JSON file ``evaluate.py --search`` writes, or its dict),
    checked as ``evaluate.py --postprocess`` checks them (``metrics.postprocess.check_params``)
    → function(results_of_one_image, height, width) → results. A file that cannot be read or
    parameters that cannot work raise ``PredictError`` naming the file and the entry."""
    from metrics.postprocess import apply_postprocess, check_params
    from metrics.validation import InvalidInputError

    if isinstance(spec, dict):
        params, where = spec, "post-processing parameters"
    else:
        params, where = load_json(spec, "--postprocess", PredictError), f"--postprocess file {spec}"
    try:
        params = check_params(params, where)
    except InvalidInputError as exc:
        raise PredictError(str(exc)) from None
    return lambda results, height, width: apply_postprocess(results, params, height, width)


def load_model(path: Path, device: torch.device, box_score_thresh: float, detections_per_img: int | None):
    """Checkpoint → (eval-mode model on ``device``, class names, preprocessing contract)."""
    from engine.checkpoint import CheckpointError, build_model_from_checkpoint, load_checkpoint

    try:
        state = load_checkpoint(path)
        overrides = {}
        if box_score_thresh < float(state["config"].get("box_score_thresh", 0.05)):
            overrides["box_score_thresh"] = box_score_thresh    # keep low-score detections if asked
        if detections_per_img:
            overrides["detections_per_img"] = detections_per_img
        model, _ = build_model_from_checkpoint(state, **overrides)
    except CheckpointError as exc:
        raise PredictError(str(exc)) from exc
    except (KeyError, RuntimeError, ValueError) as exc:
        raise PredictError(f"checkpoint {path} does not match this code's models "
                           f"({type(exc).__name__}: {exc})") from exc
    class_names = list(state.get("class_names") or [])
    return model.to(device).eval(), class_names, Preprocessing.from_config(state["config"])


def unique_names(paths: list[Path]) -> list[str]:
    """Output names (file stems), made unique by prefixing parent folders where stems collide."""
    names: list[str] = []
    used: set[str] = set()
    for path in paths:
        name, parents = path.stem, list(path.resolve().parents)
        level = 0
        while name in used:
            if level < len(parents) and parents[level].name:
                name = f"{parents[level].name}_{name}"
                level += 1
            else:
                name = f"{name}_{len(used)}"
        used.add(name)
        names.append(name)
    return names


# ------------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, every 10 % otherwise)."""

    def __init__(self, total: int, enabled: bool = True, stream=None, unit: str = "images", min_total: int = 4):
        stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.unit = total, 0, unit
        self.enabled, self.stream = enabled and total >= min_total, stream
        self.start = time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._last_decile = -1

    def update(self, count: int = 1) -> None:
        self.done += count
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        filled = int(30 * self.done / self.total)
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {self.unit}  "
                f"{rate:.2f}/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.done >= self.total else ""))
            self.stream.flush()
        elif self.done * 10 // self.total != self._last_decile:
            self._last_decile = self.done * 10 // self.total
            self.stream.write(line + "\n")


# ------------------------------------------------------------------------------- model calls


def model_view(image: torch.Tensor) -> np.ndarray:
    """Model input ``3×H×W`` in [0, 1] → ``H×W×3`` uint8 (what the model saw, for overlays)."""
    return (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def predict_instances(model: torch.nn.Module | Sequence[torch.nn.Module], images: list[torch.Tensor],
                      device: torch.device, amp: bool = False, tta: bool = False,
                      mask_thresh: float = 0.5) -> list[Instances]:
    """Float ``3×H×W`` images → one ``Instances`` per image (all detections, score-descending).
    Several models (an ensemble of fold models) and flip TTA are fused by ``engine.tta``."""
    images = [img.to(device) for img in images]
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if tta or len(models) > 1:
        from engine.tta import FLIPS, predict_ensemble

        return predict_ensemble(models, images, amp=amp, mask_threshold=mask_thresh,
                                flips=FLIPS if tta else ("none",))
    model = models[0]
    with autocast_context(device, amp):
        outputs = detect(model, images)
    return [Instances.from_detections(out, mask_thresh) for out in outputs]


def input_scale(model: torch.nn.Module, height: int, width: int, largest: bool = False) -> float:
    """The factor the model's transform resizes a ``height×width`` image by in eval mode: its
    fixed test scale, or torchvision's min/max-size rule for this image. ``largest``: with
    per-image scales (``engine.inference.detect``), the largest one it may choose."""
    transform = unwrap(model).transform
    if hasattr(transform, "test_scale"):
        if largest and getattr(transform, "object_diameter", None) is not None:
            return max(float(transform.test_scale), transform.scale * OBJECT_SCALE_RANGE[1])
        return float(transform.test_scale)
    short, long = min(height, width), max(height, width)
    return min(float(transform.min_size[-1]) / short, float(transform.max_size) / long)


@contextlib.contextmanager
def fixed_scale(models: Sequence[torch.nn.Module], scale: float):
    """Within the block, every model resizes every input by ``scale`` (tiles of a large image
    are seen at the scale the whole image would be, not each resized to ``min_size`` or each at
    a per-image scale of its own)."""
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(_fixed_scale(model, scale))
        yield


@contextlib.contextmanager
def _fixed_scale(model: torch.nn.Module, scale: float):
    from models.scale import ScaleTransform

    net = unwrap(model)
    original = net.transform
    if isinstance(original, ScaleTransform):
        saved = original.object_diameter
        original.object_diameter = None
        try:
            with test_scale(original, scale):
                yield
        finally:
            original.object_diameter = saved
        return
    net.transform = ScaleTransform(scale, original.image_mean, original.image_std,
                                   size_divisible=original.size_divisible)
    try:
        yield
    finally:
        net.transform = original


# ------------------------------------------------------------------------------- results


@dataclass
class Prediction:
    """One image's result. ``instances``: the final instances (score ≥ the threshold, or what
    the post-processing kept; non-overlapping, descending score, box crops); ``detections``:
    every detection of the model (score ≥ its ``box_score_thresh``, overlaps kept), what
    ``predictions.json`` and evaluate.py's post-processing search read. ``view``: ``H×W×3``
    uint8 of what the model saw (after the preprocessing contract), or ``None``."""
    name: str
    detections: Instances
    instances: Instances
    class_names: list[str]
    view: np.ndarray | None = None
    path: Path | None = None
    tiles: int = 1                              # tiles the image was predicted in (1: whole)
    _cache: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.instances)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.instances.image_size

    @property
    def boxes(self) -> np.ndarray:
        """float32 ``N×4`` xyxy pixels (tight around the final masks)."""
        return self.instances.boxes

    @property
    def scores(self) -> np.ndarray:
        return self.instances.scores

    @property
    def labels(self) -> np.ndarray:
        """int64 ``N`` class ids ``1..C``."""
        return self.instances.labels

    @property
    def label_names(self) -> list[str]:
        """Class name of each instance (the id as text where the checkpoint has no name)."""
        return [self.class_names[k - 1] if 0 < k <= len(self.class_names) else str(k) for k in self.labels.tolist()]

    @property
    def label_image(self) -> np.ndarray:
        """``H×W`` uint16 (int32 above 65535 instances): 0 background, ``k`` for instance ``k``."""
        if "labels" not in self._cache:
            self._cache["labels"] = box_masks_to_label_image(self.instances.masks)
        return self._cache["labels"]

    @property
    def rles(self) -> list[dict]:
        """Compressed COCO RLE (``counts`` str, ``size`` [H, W]) of each instance."""
        if "rles" not in self._cache:
            self._cache["rles"] = box_masks_to_coco_rle(self.instances.masks)
        return self._cache["rles"]

    def to_coco(self, image_id: Any = None, every_detection: bool = False) -> list[dict]:
        """COCO results entries (``image_id`` default: the name). ``every_detection``: all of the
        model's detections (overlaps kept) instead of the final instances."""
        image_id = self.name if image_id is None else image_id
        if every_detection:
            return self.detections.to_coco_results(image_id)
        from utils.instances import coco_result_entries

        return coco_result_entries(image_id, self.boxes, self.scores, self.labels, self.rles)

    def to_kaggle_rows(self, image_id: str | None = None) -> list[str]:
        """Kaggle Sartorius ``id,predicted`` rows (one per instance; ``id,`` for none)."""
        return submission_rows(self.name if image_id is None else image_id, self.instances)

    def overlay(self, text: bool = False, image: np.ndarray | None = None) -> np.ndarray:
        """``H×W×3`` uint8: the view (or ``image``) with each instance tinted and outlined;
        ``text`` writes class and score at each box."""
        base = self.view if image is None else image
        if base is None:
            raise ValueError(f"{self.name}: no image to draw on (predicted with keep_view=False); pass image=")
        return render_overlay(base, self.label_image, self.instances if text else None, self.class_names)


# ------------------------------------------------------------------------------- predictor


@dataclass
class _Item:
    name: str
    path: Path | None
    source: Any                    # a path to decode, or the array itself


class Predictor:
    """A model with its preprocessing contract, class names and prediction options.

    ``score_thresh``: minimum score of the final instances (ignored with ``postprocess``);
    ``mask_thresh``: mask probability threshold; ``tta``: flip TTA; ``postprocess``: the
    parameters ``evaluate.py --search`` chose (file or dict); ``tile``: tile side in image pixels
    (``None``: automatic above ``auto_tile_pixels`` model-input pixels; ``0``: never);
    ``keep_view``: keep what the model saw, for ``Prediction.overlay``.
    """

    def __init__(self, model: torch.nn.Module | Sequence[torch.nn.Module], contract: Preprocessing,
                 class_names: list[str],
                 device: torch.device | str = "cpu", *, score_thresh: float = 0.5, mask_thresh: float = 0.5,
                 tta: bool = False, postprocess: str | os.PathLike | dict | Callable | None = None,
                 batch_size: int = 1, amp: bool = False, tile: int | None = None,
                 tile_overlap: int = DEFAULT_TILE_OVERLAP, auto_tile_pixels: int = AUTO_TILE_PIXELS,
                 keep_view: bool = True):
        if batch_size < 1:
            raise PredictError(f"--batch-size must be ≥ 1, got {batch_size}")
        if not 0 <= score_thresh <= 1 or not 0 < mask_thresh < 1:
            raise PredictError("--score-thresh must be in [0, 1] and --mask-thresh in (0, 1)")
        if tile is not None and tile != 0 and tile < 64:
            raise PredictError(f"--tile must be 0 (never tile) or ≥ 64 pixels, got {tile}")
        if not 0 <= tile_overlap < (tile or DEFAULT_TILE) // 2:
            raise PredictError(f"--tile-overlap must be in 0..{(tile or DEFAULT_TILE) // 2 - 1} "
                               f"(less than half the tile), got {tile_overlap}")
        # Several models: an ensemble (fold models), fused like TTA; ``model`` is the first.
        self.models = [m.eval() for m in (model if isinstance(model, (list, tuple)) else [model])]
        self.model = self.models[0]
        self.contract = contract
        self.class_names = list(class_names)
        self.device = torch.device(device)
        self.score_thresh, self.mask_thresh = score_thresh, mask_thresh
        self.tta, self.batch_size, self.amp = tta, batch_size, amp
        self.tile, self.tile_overlap, self.auto_tile_pixels = tile, tile_overlap, auto_tile_pixels
        self.keep_view = keep_view
        if postprocess is None or callable(postprocess):
            self.postprocess = postprocess
        else:
            self.postprocess = load_postprocess(postprocess)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | Sequence[str | os.PathLike], device: str = "auto",
                        tta: bool = False,
                        postprocess: str | os.PathLike | dict | Callable | None = None, *,
                        score_thresh: float = 0.5, detections_per_img: int | None = None,
                        **options) -> "Predictor":
        """Load ``path`` (a ``.pth`` file or a run folder; a list of them: an ensemble of models of
        one task and preprocessing) onto ``device`` (``auto``: CUDA when available). ``options``
        are the other ``Predictor`` arguments."""
        from engine.distributed import resolve_device

        files = [checkpoint_file(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
        if postprocess is not None and not callable(postprocess):
            postprocess = load_postprocess(postprocess)
        try:
            dev = resolve_device(device, 0)
        except RuntimeError as exc:
            raise PredictError(str(exc)) from exc
        models: list[torch.nn.Module] = []
        class_names: list[str] = []
        contract: Preprocessing | None = None
        for file in files:
            model, names, preprocessing = load_model(file, dev, score_thresh, detections_per_img)
            if models and (names, preprocessing) != (class_names, contract):
                raise PredictError(f"{file}: classes {names} / input {preprocessing} differ from {files[0]}'s "
                                   f"({class_names} / {contract}); an ensemble needs models of one task and "
                                   f"one preprocessing")
            models.append(model)
            class_names, contract = names, preprocessing
        return cls(models if len(models) > 1 else models[0], contract, class_names, dev, score_thresh=score_thresh, tta=tta,
                   postprocess=postprocess, **options)

    # -------------------------------------------------------------------- inputs

    def _items(self, x) -> tuple[list[_Item], bool]:
        """Inputs → items, and whether one result (not a list) is asked for."""
        if isinstance(x, (str, os.PathLike)):
            path = Path(x)
            if path.is_file():
                return [_Item(path.stem, path, path)], True
            paths, problems = expand_inputs([str(x)])
            if not paths:
                raise PredictError("; ".join(problems) or f"{x}: no images")
            return [_Item(n, p, p) for n, p in zip(unique_names(paths), paths)], False
        if isinstance(x, np.ndarray):
            return [_Item("image", None, x)], True
        if isinstance(x, (list, tuple)):
            items: list[_Item] = []
            paths = [Path(v) for v in x if isinstance(v, (str, os.PathLike))]
            names = iter(unique_names(paths))
            for k, value in enumerate(x):
                if isinstance(value, (str, os.PathLike)):
                    items.append(_Item(next(names), Path(value), Path(value)))
                elif isinstance(value, np.ndarray):
                    items.append(_Item(f"image{k}", None, value))
                else:
                    raise PredictError(f"input {k}: expected a path or a numpy array, got {type(value).__name__}")
            return items, False
        raise PredictError(f"expected a path, a folder, a numpy array or a list of them, got {type(x).__name__}")

    def predict(self, x, progress: bool = False) -> Prediction | list[Prediction]:
        """Predict ``x``: an image path, a numpy array (``H×W`` or ``H×W×C``, any dtype the
        preprocessing contract accepts), a folder, a glob pattern, or a list of paths/arrays.
        One ``Prediction`` for one path or array, else a list in input order. An unreadable
        image raises ``utils.image_files.ImageReadError`` naming it."""
        items, single = self._items(x)
        results = list(self._predict_items(items, progress=progress))
        return results[0] if single else results

    def predict_paths(self, paths: list[Path], names: list[str] | None = None,
                      on_error: Callable[[str], None] | None = None, progress: bool = False) -> Iterator[Prediction]:
        """Results of ``paths`` one by one (outputs can be written and dropped as they come).
        With ``on_error``, an unreadable image is reported to it by a message naming the file and
        skipped; without, it raises."""
        names = names or unique_names(paths)
        return self._predict_items([_Item(n, p, p) for n, p in zip(names, paths)], on_error, progress)

    def _read(self, item: _Item) -> np.ndarray:
        return decode_image(item.source) if item.path is not None else np.asarray(item.source)

    def _predict_items(self, items: list[_Item], on_error: Callable[[str], None] | None = None,
                       progress: bool = False) -> Iterator[Prediction]:
        bar = Progress(len(items), enabled=progress)
        pending: list[tuple[_Item, np.ndarray, torch.Tensor]] = []

        def flush() -> Iterable[Prediction]:
            images = [image for _, _, image in pending]
            instances = predict_instances(self.models, images, self.device, self.amp, self.tta, self.mask_thresh)
            for (item, _, image), found in zip(pending, instances):
                view = model_view(image) if self.keep_view else None
                yield self._finish(item, found, view, 1)
            pending.clear()

        for item in items:
            try:
                array = self._read(item)
                tile = self._tile_size(array.shape[0], array.shape[1])
                image = to_model_input(array, self.contract) if tile is None else None
            except ValueError as exc:     # ImageReadError names the file; the contract's errors don't
                message = str(exc) if isinstance(exc, ImageReadError) else f"{item.path or item.name}: {exc}"
                if on_error is None:
                    raise ImageReadError(message) from exc
                on_error(message)
                bar.update()
                continue
            if tile is None:
                pending.append((item, array, image))
                if len(pending) == self.batch_size:
                    for result in flush():
                        yield result
                        bar.update()
                continue
            for result in flush() if pending else ():
                yield result
                bar.update()
            yield self._predict_tiled(item, array, tile, progress)
            bar.update()
        for result in flush() if pending else ():
            yield result
            bar.update()

    # -------------------------------------------------------------------- per image

    def _finish(self, item: _Item, detections: Instances, view: np.ndarray | None, tiles: int) -> Prediction:
        """Detections → final instances: threshold (or post-processing), overlaps removed by score."""
        height, width = detections.image_size
        if self.postprocess is not None:
            kept = self.postprocess(detections.to_coco_results(item.name), height, width)
            final = Instances.from_coco_results(kept, height, width)
        else:
            final = detections.above(self.score_thresh)
        return Prediction(item.name, detections, final.non_overlapping(), self.class_names, view, item.path, tiles)

    def _tile_size(self, height: int, width: int) -> int | None:
        """The tile side for a ``height×width`` image, or ``None`` to predict it whole."""
        if self.tile == 0:
            return None
        if self.tile is not None:
            return self.tile if max(height, width) > self.tile else None
        scale = input_scale(self.model, height, width, largest=True)
        return DEFAULT_TILE if height * width * scale * scale > self.auto_tile_pixels else None

    def _tiled_scale(self, array: np.ndarray, bounds, tile: int) -> float:
        """The scale every tile of ``array`` is seen at: the model's test scale, or with per-image
        scales (``engine.inference.detect``) the one its centre tile's objects ask for."""
        height, width = array.shape[:2]
        scale = input_scale(self.model, height, width)
        transform = unwrap(self.model).transform
        if getattr(transform, "object_diameter", None) is None:
            return scale
        y0, x0 = max((height - tile) // 2, 0), max((width - tile) // 2, 0)
        centre = to_model_input(array[y0:y0 + tile, x0:x0 + tile], self.contract, bounds).to(self.device)
        with autocast_context(self.device, self.amp):
            first = detect(self.model, [centre], [scale])[0]
        return object_scale(transform, first["object_diameter"])

    def _predict_tiled(self, item: _Item, array: np.ndarray, tile: int, progress: bool) -> Prediction:
        """One large image in overlapping tiles, merged across the seams (``engine.tiling``).
        The contract's intensity statistics come from the whole image, so every tile is
        converted as the whole image would be."""
        height, width = array.shape[:2]
        bounds = intensity_bounds(array, self.contract)
        scale = self._tiled_scale(array, bounds, tile)
        align = stride_aligned_step(scale)
        if align > (tile - self.tile_overlap) // 2:    # a grid that coarse would cost more tiles than it saves
            align = 1
        grid = tile_grid(height, width, tile, self.tile_overlap, align)
        bar = Progress(len(grid), enabled=progress, unit=f"tiles of {item.name}", min_total=2)
        parts = []
        with fixed_scale(self.models, scale):
            for first in range(0, len(grid), self.batch_size):
                batch = grid[first:first + self.batch_size]
                images = [to_model_input(array[t.y0:t.y1, t.x0:t.x1], self.contract, bounds) for t in batch]
                found = predict_instances(self.models, images, self.device, self.amp, self.tta, self.mask_thresh)
                parts += zip(batch, found)
                bar.update(len(batch))
        detections = merge_tiles(parts, height, width)
        view = None
        if self.keep_view:
            view = np.empty((height, width, 3), dtype=np.uint8)
            for y in range(0, height, VIEW_BAND_ROWS):
                view[y:y + VIEW_BAND_ROWS] = model_view(to_model_input(array[y:y + VIEW_BAND_ROWS], self.contract, bounds))
        return self._finish(item, detections, view, len(grid))
