"""The frozen training configuration, built once from flags and dataset defaults.

Resolution order for every option: an explicit flag, then the dataset's defaults
(``register_dataset(..., defaults=...)``), then the field default below.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from models.zoo import ModelOptions, check_model_name


class ConfigError(ValueError):
    """A flag value that cannot work; the message names the flag and what to do."""


@dataclass(frozen=True)
class TrainConfig(ModelOptions):
    """Every setting of a training run, built once from the flags (``train.config_from_args``:
    flags over the dataset's defaults over these field defaults) and validated; frozen afterwards.

    Saved in each checkpoint (``to_dict``) and read back with ``from_dict``; evaluation and
    predict.py rebuild the model and its input preprocessing from it alone. One field per
    ``train.py`` flag (README's flags table), plus ``dataset_options``: the format's own option
    keys (``datasets.registry.option_keys``), typed and checked when the dataset is built.
    The model's options (input size and scale, anchors, caps, thresholds, trainable backbone
    layers) are ``models.zoo.ModelOptions``' fields, inherited: declared and checked there.
    """
    # data
    dataset: str = "synthetic"
    data_path: str | None = None
    dataset_options: dict = field(default_factory=dict)   # format-specific keys (checked by datasets.registry)
    data_augmentation: str = "hflip"
    intensity: str = "percentile"                           # 16-bit/float images: per-image percentiles or full range
    channels: str = "auto"                                  # gray or rgb; auto: from the first training image
    min_epoch_iters: int = 16                               # tiny datasets repeat within an epoch up to this
    aspect_ratio_group_factor: int = 3                      # -1 disables grouping
    workers: int = 2
    # model
    model: str | None = None                                # None: R50-FPN on CUDA, R18-FPN on CPU
    weights: str | None = None
    weights_backbone: str | None = None
    sync_bn: bool = False
    # optimisation
    device: str = "auto"
    batch_size: int = 2                                     # images per process
    epochs: int | None = None                               # None: 26, or what --max-time allows
    max_time: float | None = None                           # seconds of wall time for the whole run
    opt: str = "sgd"
    lr: float | None = None                                 # None: 0.02 for SGD, 0.001 for AdamW
    momentum: float = 0.9
    weight_decay: float | None = None                       # None: 1e-4 for SGD, 0.05 for AdamW
    lr_scheduler: str = "multistep"
    lr_steps: tuple | None = None                           # epochs; None: at 16/26 and 22/26 of the run
    lr_gamma: float = 0.1
    warmup_iters: int | None = None                         # None: 5 % of the run, at most 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0                             # 0 disables
    amp: bool | None = None                                 # None: bf16 on a CPU with bf16 units (cpu_has_fast_bf16), else off
    max_nonfinite: int = 5                                  # consecutive non-finite losses before stopping
    # evaluation and checkpoints
    eval_every: int | None = None                           # epochs; 0 only at the end; None: about 4 per run
    best_metric: str = "segm_AP"
    sartorius_score_thresh: float = 0.5
    test_only: bool = False
    # run
    output_dir: str = "runs"
    name: str | None = None                                 # run directory name; default: timestamp
    resume: str | None = None
    seed: int = 42
    deterministic: bool = False
    print_freq: int = 20

    def data_options(self) -> dict[str, Any]:
        """What ``datasets.build_dataset`` takes for this run: ``data_path`` and the format's options."""
        return {"data_path": self.data_path, **self.dataset_options}

    def model_options(self) -> ModelOptions:
        """The options ``models.build_model`` takes: this config's ``ModelOptions`` fields."""
        return ModelOptions(**{f.name: getattr(self, f.name) for f in fields(ModelOptions)})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists); stored in checkpoints and config.json."""
        return json_ready(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """The config ``to_dict`` wrote; a checkpoint's from before a field existed gets what that
        field's absence meant (``PREDATING``), not today's default."""
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for k, v in with_predating(values).items():
            if k in known:
                kwargs[k] = tuple(v) if isinstance(v, list) else v
        return cls(**kwargs)


# Fields added after checkpoints were written whose default is not what those checkpoints did.
PREDATING = {"head_norm": "none"}   # models before --head-norm had no norm in the FPN / mask head


def with_predating(saved: dict[str, Any]) -> dict[str, Any]:
    """A stored config with ``PREDATING`` values for the fields it predates."""
    return {**PREDATING, **saved}


def json_ready(value):
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


BEST_METRICS = ("segm_AP", "segm_AP50", "bbox_AP", "bbox_AP50", "sartorius")


# A dataset's run length is one choice, and a flag for either part replaces all of it: the
# synthetic data's 12 epochs must not cut ``--max-time 10m`` short (a budget fills its time),
# nor would a dataset's budget cut ``--epochs 30``.
RUN_LENGTH = ("epochs", "max_time")


def resolve_config(explicit: dict[str, Any], dataset_defaults: dict[str, Any]) -> TrainConfig:
    """Merge explicit flags over dataset defaults over field defaults, then validate."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(dataset_defaults) - known
    if unknown:
        raise ConfigError(f"dataset defaults name unknown options: {sorted(unknown)}")
    if any(explicit.get(k) is not None for k in RUN_LENGTH):
        dataset_defaults = {k: v for k, v in dataset_defaults.items() if k not in RUN_LENGTH}
    merged = {**{k: v for k, v in dataset_defaults.items()}, **{k: v for k, v in explicit.items() if v is not None}}
    merged = {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}
    config = TrainConfig(**merged)
    validate(config)
    return dataclasses.replace(config, **resolved_defaults(config))


# What an AdamW or SGD run needs differs by an order of magnitude; a flag left unset gets its
# optimizer's value (SGD: torchvision's COCO recipe; AdamW: from-scratch cell runs, docs/benchmarks.md).
OPTIMIZER_DEFAULTS = {"sgd": {"lr": 0.02, "weight_decay": 1e-4}, "adamw": {"lr": 1e-3, "weight_decay": 0.05}}
# On a CPU an R50-FPN step costs ~4× an R18-FPN one: in minutes of CPU the small model learns more.
DEVICE_MODELS = {"cuda": "maskrcnn_resnet50_fpn", "cpu": "maskrcnn_resnet18_fpn"}


def device_kind(device: str) -> str:
    """``"cuda"`` or ``"cpu"``: what ``--device`` resolves to on this machine."""
    if device == "auto":
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def isa_cap_allows_bf16(cap: str) -> bool:
    """Whether oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``; empty: none) still lets it use bf16 dot
    products: ``AVX512_CORE_BF16`` and every level above it (``AVX512_CORE_FP16``, the ``AMX``
    and ``AVX10`` levels, ``ALL``/``DEFAULT``); ``AVX2``, ``AVX512_CORE`` and ``AVX512_CORE_VNNI``
    do not."""
    cap = cap.strip().upper()
    return not cap or cap in ("ALL", "DEFAULT") or any(key in cap for key in ("BF16", "FP16", "AMX", "AVX10"))


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware and oneDNN may use it: AMX tiles (Intel Xeon
    since Sapphire Rapids) or AVX-512 BF16 dot products (AMD EPYC since Zen 4, Intel Cooper Lake).
    There bf16 autocast makes a training step 1.2–1.7× faster at the same accuracy (quick start
    with AMX 4 min 8 s → 3 min 6 s, segm AP 0.672 → 0.694, MoNuSeg in 20 minutes 789 steps
    instead of 574, DSB 0.299 → 0.319; on a Zen 4 EPYC 4 min 26 s → 3 min 13 s, segm AP 0.659
    → 0.699, a MoNuSeg step 1.84 → 1.09 s; docs/benchmarks.md); without them oneDNN emulates
    bf16 and a step is slower than in fp32 (2.5× with AVX-512 alone, 28× with AVX2)."""
    import os

    import torch
    if not isa_cap_allows_bf16(os.environ.get("ONEDNN_MAX_CPU_ISA", "")):
        return False
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):   # private, hence guarded
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:
            pass
    return False


def resolved_defaults(c: TrainConfig) -> dict[str, Any]:
    """Values for the options left ``None`` that depend on other options (optimizer, device)."""
    out: dict[str, Any] = {}
    for key, value in OPTIMIZER_DEFAULTS[c.opt].items():
        if getattr(c, key) is None:
            out[key] = value
    if c.model is None:
        out["model"] = DEVICE_MODELS[device_kind(c.device)]
    if c.amp is None:   # CUDA keeps fp32 unless asked: its AMP (fp16) needs a loss scaler and care
        out["amp"] = device_kind(c.device) == "cpu" and cpu_has_fast_bf16()
    if c.head_norm is None:
        out["head_norm"] = check_model_name(out.get("model", c.model)).head_norm
    return out


def validate(c: TrainConfig) -> None:
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    if c.model is not None:
        try:
            variant = check_model_name(c.model)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        need(not (variant.v2 and c.head_norm == "none"),
             f"--head-norm none: {c.model} is built with BatchNorm in its heads; choose another --model")
    try:
        c.model_options().check()   # the model's options are checked where they are declared
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    need(c.batch_size >= 1, f"--batch-size must be ≥ 1, got {c.batch_size}")
    need(c.epochs is None or c.epochs >= 1, f"--epochs must be ≥ 1, got {c.epochs}")
    need(c.lr is None or c.lr > 0, f"--lr must be > 0, got {c.lr}")
    need(c.workers >= 0, f"--workers must be ≥ 0, got {c.workers}")
    need(c.weight_decay is None or c.weight_decay >= 0, f"--wd must be ≥ 0, got {c.weight_decay}")
    need(0 <= c.momentum < 1, f"--momentum must be in [0, 1), got {c.momentum}")
    need(c.opt in ("sgd", "adamw"), f"--opt must be sgd or adamw, got {c.opt!r}")
    need(c.lr_scheduler in ("multistep", "cosine"), f"--lr-scheduler must be multistep or cosine, got {c.lr_scheduler!r}")
    need(c.lr_steps is None or all(s > 0 for s in c.lr_steps),
         f"--lr-steps must be positive epochs, got {list(c.lr_steps or ())}")
    need(0 < c.lr_gamma <= 1, f"--lr-gamma must be in (0, 1], got {c.lr_gamma}")
    need(c.warmup_iters is None or c.warmup_iters >= 0, f"--warmup-iters must be ≥ 0, got {c.warmup_iters}")
    need(c.max_time is None or c.max_time > 0, f"--max-time must be > 0, got {c.max_time}")
    need(c.min_epoch_iters >= 1, f"--min-epoch-iters must be ≥ 1, got {c.min_epoch_iters}")
    from transforms.preprocess import CHANNEL_MODES, INTENSITY_POLICIES
    need(c.intensity in INTENSITY_POLICIES, f"--intensity must be one of {', '.join(INTENSITY_POLICIES)}, "
         f"got {c.intensity!r}")
    need(c.channels == "auto" or c.channels in CHANNEL_MODES,
         f"--channels must be auto, {' or '.join(CHANNEL_MODES)}, got {c.channels!r}")
    need(0 < c.warmup_factor <= 1, f"--warmup-factor must be in (0, 1], got {c.warmup_factor}")
    need(c.clip_grad_norm >= 0, f"--clip-grad-norm must be ≥ 0 (0 disables), got {c.clip_grad_norm}")
    need(c.best_metric in BEST_METRICS, f"--best-metric must be one of {', '.join(BEST_METRICS)}, got {c.best_metric!r}")
    need(c.eval_every is None or c.eval_every >= 0, f"--eval-every must be ≥ 0, got {c.eval_every}")
    need(c.print_freq >= 1, f"--print-freq must be ≥ 1, got {c.print_freq}")
    need(c.max_nonfinite >= 1, f"--max-nonfinite must be ≥ 1, got {c.max_nonfinite}")
    need(c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda"),
         f"--device must be auto, cpu, cuda or cuda:N, got {c.device!r}")
