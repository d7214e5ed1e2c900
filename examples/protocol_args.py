"""The command-line flags the example scripts share: the data and task layout, the UNet, and the evaluation.

`train.py`, `benchmark.py` and `layer_ablation.py` declare these groups here, with their own defaults where they
differ, and turn them into calls of `funlora_peft`; the package names its arguments as these flags do (without the
dashes), so a script only prefixes its own name to the package's errors (`script_error`).
"""

from __future__ import annotations

import argparse

from funlora_peft.continual.data import load_image_classification_data
from funlora_peft.continual.tasks import make_task_layout
from funlora_peft.continual.training import unet_config


def script_error(script: str, error: Exception) -> SystemExit:
    """The one-line refusal `<script>: error: <message>` (exit status 1), raised instead of a traceback."""
    return SystemExit(f"{script}: error: {error}")


def int_list(flag: str, value: str, example: str = "32,64,64") -> list[int]:
    """`"32,64,64"` -> `[32, 64, 64]`; a ValueError naming `flag` otherwise."""
    try:
        values = [int(item) for item in value.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{flag}={value!r} must be a comma-separated list of integers, e.g. {example}.") from None
    if not values:
        raise ValueError(f"{flag}={value!r} lists no integer; pass e.g. {example}.")
    return values


def check_at_least(args: argparse.Namespace, minimum: int, *flags: str) -> None:
    """Refuse any of `flags` (attribute names) whose value is below `minimum`."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise ValueError(f"--{flag}={value} must be >= {minimum}.")


# --------------------------------------------------------------------------------------------------------------------
# Data and task layout
# --------------------------------------------------------------------------------------------------------------------


def add_data_arguments(parser: argparse.ArgumentParser, *, resolution: int | None) -> None:
    group = parser.add_argument_group("data and task layout")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Dataset: None or 'digits' (scikit-learn's digits, embedded, no download), a local folder of "
        "MNIST-format IDX files (e.g. /usr/share/datasets/fashion-mnist), a local imagefolder directory (one "
        "sub-folder of images per class) or a Hugging Face Hub dataset name (e.g. 'uoft-cs/cifar100').",
    )
    group.add_argument("--image_column", type=str, default="image", help="Column holding the images (Hub datasets).")
    group.add_argument("--label_column", type=str, default="label", help="Column holding the class labels.")
    group.add_argument("--cache_dir", type=str, default=None, help="Cache directory of the `datasets` library.")
    group.add_argument(
        "--resolution",
        type=int,
        default=resolution,
        help="Images are resized to resolution x resolution (None: the dataset's own size).",
    )
    group.add_argument(
        "--classes_per_task", type=int, default=2, help="Classes per task (and in task 0 unless --first_task_classes)."
    )
    group.add_argument("--first_task_classes", type=int, default=None, help="Classes in task 0 (default: as others).")
    group.add_argument(
        "--class_order",
        type=str,
        default=None,
        help="Order in which classes arrive: 'sorted' (default), 'shuffle' (seeded by --seed) or a comma-separated "
        "list of class ids such as '3,1,2,0' (classes not listed are left out).",
    )


def load_protocol(args: argparse.Namespace, layout_seed: int) -> tuple[object, list[list[int]]]:
    """The data and the task layout the data flags describe; `layout_seed` seeds `--class_order shuffle`."""
    data = load_image_classification_data(
        args.dataset_name,
        resolution=args.resolution,
        image_column=args.image_column,
        label_column=args.label_column,
        cache_dir=args.cache_dir,
    )
    tasks = make_task_layout(
        data.class_ids,
        classes_per_task=args.classes_per_task,
        first_task_classes=args.first_task_classes,
        class_order=args.class_order,
        seed=layout_seed,
    )
    return data, tasks


# --------------------------------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------------------------------


def add_unet_arguments(parser: argparse.ArgumentParser, *, block_out_channels: str) -> None:
    group = parser.add_argument_group("UNet (no class embedding: the adapters do all the conditioning)")
    group.add_argument(
        "--block_out_channels",
        type=str,
        default=block_out_channels,
        help="Channels of each UNet level, comma-separated.",
    )
    group.add_argument("--layers_per_block", type=int, default=1, help="ResNet layers per UNet block.")
    group.add_argument(
        "--attention_level",
        type=str,
        default="last",
        help="UNet level (0 = full resolution) whose blocks get self-attention: an index, 'last' (the lowest "
        "resolution) or 'none'.",
    )
    group.add_argument("--norm_num_groups", type=int, default=8, help="GroupNorm groups; must divide every width.")
    group.add_argument("--attention_head_dim", type=int, default=8, help="Channels per attention head.")


def unet_config_from_args(args: argparse.Namespace, num_channels: int, resolution: int) -> dict:
    """`funlora_peft.continual.training.unet_config` of the UNet flags."""
    channels = int_list("--block_out_channels", args.block_out_channels)
    value = args.attention_level
    if value == "none":
        level = None
    elif value == "last":
        level = len(channels) - 1
    else:
        try:
            level = int(value)
        except ValueError:
            level = -1
        if not 0 <= level < len(channels):
            raise ValueError(
                f"--attention_level={value!r} must be 'none', 'last' or a level in 0..{len(channels) - 1}."
            )
    return unet_config(
        resolution=resolution,
        num_channels=num_channels,
        block_out_channels=channels,
        layers_per_block=args.layers_per_block,
        attention_level=level,
        norm_num_groups=args.norm_num_groups,
        attention_head_dim=args.attention_head_dim,
    )


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------


def add_evaluation_arguments(parser: argparse.ArgumentParser, *, eval_samples_per_class: int) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--num_inference_steps", type=int, default=10, help="Euler steps (NFE) of the sampler.")
    group.add_argument(
        "--eval_samples_per_class",
        type=int,
        default=eval_samples_per_class,
        help="Generated samples per class for CAS, recognition accuracy and FD.",
    )
    group.add_argument(
        "--classifier_epochs", type=int, default=15, help="Epochs of the real-data and of every CAS classifier."
    )
    group.add_argument(
        "--classifier_steps",
        type=int,
        default=None,
        help="Optimisation steps of the real-data classifier (default: --classifier_epochs epochs over the training "
        "images; on 60,000 images a fixed budget is much cheaper).",
    )
    group.add_argument(
        "--cas_steps_per_class",
        type=int,
        default=None,
        help="Each CAS classifier trains this many steps per class seen so far (default: --classifier_epochs epochs "
        "over the generated samples).",
    )
    group.add_argument(
        "--classifier_augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Random shifts when training the real-data and CAS classifiers.",
    )


def evaluator_kwargs(args: argparse.Namespace) -> dict:
    """The `ContinualEvaluator` keywords the evaluation flags set (and `train_classifier`'s, less the CAS ones)."""
    return {
        "samples_per_class": args.eval_samples_per_class,
        "classifier_epochs": args.classifier_epochs,
        "classifier_steps": args.classifier_steps,
        "cas_steps_per_class": args.cas_steps_per_class,
        "classifier_augment": args.classifier_augment,
    }


def check_evaluation_arguments(args: argparse.Namespace) -> None:
    check_at_least(args, 1, "num_inference_steps", "classifier_epochs", "classifier_steps", "cas_steps_per_class")
    if args.eval_samples_per_class < 2:
        raise ValueError(
            f"--eval_samples_per_class must be >= 2 (the Frechet distance needs a covariance), got "
            f"{args.eval_samples_per_class}."
        )
