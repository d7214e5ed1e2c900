"""Steps per second of a recipe's task 0 and of a later task, and the projected cost of the whole protocol.

Runs `examples/train.py` with a recipe's settings (by default `--recipe cifar100`: the 35.7M-parameter UNet, batch 160,
20 classes per task, EMA, bf16 on CUDA), shortened to a few hundred steps of task 0 and of task 1, on a synthetic
imagefolder of random images of the recipe's resolution and channels (the step time depends on the shapes, not on the
pixels; the Hub dataset is not needed). The steady-state step time of each task is read from the wall times of the
per-step losses that train.py logs to TensorBoard (each loss is read on the host, so a logged step has finished on
the device), after `--warmup_steps` steps, and the recipe's step budget is projected from it:

    hours = first_task_steps / (task 0 steps per second) + (tasks - 1) * task_steps / (task 1 steps per second)

Evaluation is not in the projection (it is shrunk to a minimum here). Run from the repository root:

    python examples/protocol_speed.py --output_dir runs/speed                 # the CIFAR-100 recipe, on CUDA if any
    python examples/protocol_speed.py --output_dir runs/speed --steps 5 --warmup_steps 2 -- --block_out_channels \
        32,64,64,64 --norm_num_groups 8 --attention_head_dim 8 --train_batch_size 8   # a CPU smoke run

Flags after `--` go to train.py and win over the recipe's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import protocol_args
import torch
from PIL import Image


def write_random_imagefolder(
    directory: Path, classes: int, images_per_class: int, resolution: int, channels: int
) -> None:
    """`classes` sub-folders of `images_per_class` random PNGs, RGB or grayscale (seeded: the same files every run)."""
    generator = np.random.default_rng(0)
    shape = (resolution, resolution, 3) if channels == 3 else (resolution, resolution)
    for label in range(classes):
        folder = directory / f"class_{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(images_per_class):
            pixels = generator.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")


def logged_step_times(logging_dir: Path) -> dict[int, float]:
    """Global step -> wall time of its logged loss, from train.py's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    times = {}
    for events in sorted(logging_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "loss" in accumulator.Tags()["scalars"]:
            times.update({event.step: event.wall_time for event in accumulator.Scalars("loss")})
    return times


def steps_per_second(times: dict[int, float], first_step: int, last_step: int) -> float:
    """Steps per second between the logged global steps `first_step` and `last_step` (both logged)."""
    missing = [step for step in (first_step, last_step) if step not in times]
    if missing:
        raise RuntimeError(f"steps {missing} were not logged; logged steps run {min(times)}..{max(times)}")
    return (last_step - first_step) / (times[last_step] - times[first_step])


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=sorted(protocol_args.RECIPES), default="cifar100")
    parser.add_argument("--output_dir", type=Path, required=True, help="Run folder and synthetic data go here.")
    parser.add_argument("--steps", type=int, default=300, help="Timed steps of task 0 and of task 1 (default 300).")
    parser.add_argument(
        "--warmup_steps", type=int, default=30, help="Untimed steps at the start of each task (default 30)."
    )
    parser.add_argument("--images_per_class", type=int, default=32, help="Synthetic images per class (default 32).")
    parser.add_argument("--output", type=Path, default=None, help="Also write the figures as JSON to this file.")
    args = parser.parse_args(own)
    if args.steps < 1 or args.warmup_steps < 1:
        parser.error(f"--steps and --warmup_steps must be >= 1, got {args.steps} and {args.warmup_steps}")
    return args, passthrough


def main(args: argparse.Namespace, train_flags: list[str]) -> dict:
    import train

    recipe = protocol_args.RECIPES[args.recipe]
    per_task = args.warmup_steps + args.steps
    data = args.output_dir / "data"
    run_dir = args.output_dir / "run"
    argv = ["--recipe", args.recipe, "--dataset_name", str(data), "--image_column", "image", "--label_column", "label"]
    argv += ["--first_task_steps", str(per_task), "--task_steps", str(per_task), "--checkpointing_steps", "1000000"]
    argv += ["--eval_samples_per_class", "2", "--classifier_steps", "2", "--cas_steps_per_class", "1"]
    argv += ["--grid_samples_per_class", "1", "--num_inference_steps", "2", "--report_to", "tensorboard"]
    argv += ["--output_dir", str(run_dir), "--overwrite_output_dir", *train_flags]
    train_args = train.parse_args(argv)
    if not data.is_dir():  # two tasks: the classes of task 0 and of task 1, as the flags set them
        channels = protocol_args.RECIPE_DATASETS[args.recipe]["channels"]
        classes = 2 * train_args.classes_per_task
        write_random_imagefolder(data, classes, args.images_per_class, train_args.resolution, channels)
    train.main(train_args)

    times = logged_step_times(run_dir / train_args.logging_dir)
    task0 = steps_per_second(times, args.warmup_steps, per_task)
    task1 = steps_per_second(times, per_task + args.warmup_steps, 2 * per_task)
    num_tasks = protocol_args.RECIPE_DATASETS[args.recipe]["classes"] // recipe["classes_per_task"]
    hours = (recipe["first_task_steps"] / task0 + (num_tasks - 1) * recipe["task_steps"] / task1) / 3600
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    result = {
        "recipe": args.recipe,
        "device": device,
        "mixed_precision": train_args.mixed_precision,
        "train_batch_size": train_args.train_batch_size,
        "task1_train_batch_size": protocol_args.task_setting(train_args, "train_batch_size", 1),
        "classes_per_task": train_args.classes_per_task,
        "timed_steps": args.steps,
        "task0_steps_per_second": task0,
        "task1_steps_per_second": task1,
        "recipe_steps": {"first_task_steps": recipe["first_task_steps"], "task_steps": recipe["task_steps"]},
        "num_tasks": num_tasks,
        "projected_training_hours": hours,
    }
    print(
        f"{args.recipe} on {device} ({train_args.mixed_precision or 'fp32'}, batch {train_args.train_batch_size}): "
        f"task 0 {task0:.2f} steps/s, task 1 {task1:.2f} steps/s; {recipe['first_task_steps']} + {num_tasks - 1} x "
        f"{recipe['task_steps']} steps -> {hours:.2f} hours of training (evaluation not included)"
    )
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(*parse_args())
