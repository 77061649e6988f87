"""Where one training step of the quick start spends its CPU time (torch.profiler table).

Builds the model and data exactly as ``python train.py [FLAGS]`` would, takes one fixed batch
(images 5-8 of the training split, image 7 dense), warms up, times two steps, then profiles one.

    python bench/profile_step.py                      # the no-argument quick start
    python bench/profile_step.py --box-batch-size-per-image 512
    python bench/profile_step.py --no-amp             # fp32 where the default is bf16 (CPUs with bf16 units)

The step runs under the run's autocast setting (``--amp``; by default bf16 on a CPU with bf16 units: AMX or AVX-512 BF16).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def main() -> None:
    import train
    from datasets import build_dataset
    from engine.evaluation import autocast_context
    from engine.optim import build_optimizer
    from models import build_model
    from transforms import build_transforms
    from transforms.preprocess import Preprocessing
    from transforms.presets import crop_size_for

    args = train.get_args_parser().parse_args(sys.argv[1:])
    config = train.config_from_args(args)
    dataset = build_dataset(config.dataset, "train", config.data_options(), None)
    # What train.py decides from the data (input scale, anchors, caps, channels) before building the
    # model: without it a folder dataset would be profiled at torchvision's min_size 800.
    config = train.resolve_from_data(config, train.pinned_options(args), dataset)
    dataset.transforms = build_transforms(config.data_augmentation, True, Preprocessing.from_config(config.to_dict()),
                                          crop_size=crop_size_for(config.input_scale))
    model = build_model(config.model, len(dataset.class_names), config.model_options(), config.weights,
                        config.weights_backbone)
    model.train()
    optimizer = build_optimizer(model, config)
    torch.manual_seed(config.seed)
    batch = [dataset[i % len(dataset)] for i in range(5, 5 + config.batch_size)]
    images, targets = [image for image, _ in batch], [target for _, target in batch]

    device = torch.device("cpu")

    def step() -> None:
        with autocast_context(device, config.amp):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(2):
        step()
    print(f"{config.model}, {config.batch_size} images of {[tuple(i.shape[-2:]) for i in images]} "
          f"(input scale {config.input_scale}), {torch.get_num_threads()} threads, "
          f"{'bf16 autocast' if config.amp else 'fp32'}: "
          f"{(time.perf_counter() - start) / 2:.3f} s/step")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
