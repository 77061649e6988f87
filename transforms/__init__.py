from transforms.presets import PRESETS, build_transforms

__all__ = ["PRESETS", "build_transforms"]
