"""The command-line flags the example scripts share: the data and task layout, the UNet, and the evaluation.

`train.py`, `benchmark.py` and `layer_ablation.py` declare these groups here, with their own defaults where they
differ, and turn them into calls of `funlora_peft`; the package names its arguments as these flags do (without the
dashes), so a script only prefixes its own name to the package's errors (`script_error`). The named recipes
(`--recipe`) live here too, so that `train.py` and `benchmark.py` run the same protocol from the same flag.
"""

from __future__ import annotations

import argparse

from funlora_peft import FunLoRAConfig
from funlora_peft.continual.data import FASHION_MNIST_DIRECTORY, is_idx_directory, load_image_classification_data
from funlora_peft.continual.tasks import make_task_layout
from funlora_peft.continual.training import unet_config
from funlora_peft.flow_matching import check_shift


def script_error(script: str, error: Exception) -> SystemExit:
    """The one-line refusal `<script>: error: <message>` (exit status 1), raised instead of a traceback."""
    return SystemExit(f"{script}: error: {error}")


def diverged_message(error: Exception, args: argparse.Namespace, flags: list[str], after: str = "") -> str:
    """What to say of a run whose loss diverged (`funlora_peft.continual.training.TrainingDiverged`): the error and
    the learning-rate `flags` (attribute names) of what the task trained, with their values. (Clipping the gradients'
    norm does not bound the steps of Adam, which divides by the gradients' own scale: the rate does.)"""
    rates = " or ".join(f"--{flag} (now {getattr(args, flag):g})" for flag in flags)
    return f"{error} Lower {rates}{after}."


def diverged_error(
    script: str, error: Exception, args: argparse.Namespace, flags: list[str], after: str = ""
) -> SystemExit:
    """The one-line refusal of a run whose loss diverged (`diverged_message`)."""
    return script_error(script, diverged_message(error, args, flags, after))


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
# Recipes
# --------------------------------------------------------------------------------------------------------------------

# Named recipes: defaults for the flags, selected with --recipe; flags given on the command line still win. A script
# takes the entries it declares (benchmark.py has no --function: each of its methods names its own family).
RECIPES = {
    # Fashion-MNIST at its native 28x28, 5 tasks of 2 classes (docs/fashion_mnist.md: the search that chose it).
    "fashion-mnist": {
        "dataset_name": FASHION_MNIST_DIRECTORY,
        "resolution": 28,
        "classes_per_task": 2,
        "block_out_channels": "32,64,64",
        # rshift: the family closest to joint training on each of three seeds (docs/fashion_mnist.md, "The function").
        "function": "rshift",
        "num_functions": 10,
        "init_omega": 0.3,  # cos's frequencies, for `--function cos`
        "train_batch_size": 64,
        "first_task_steps": 600,
        "learning_rate": 2e-3,
        "lr_warmup_steps": 50,
        "task_train_batch_size": 32,
        # 1,000 steps per later task (300 before): FD back to task 0's level, CAS within 0.01 of joint training's.
        "task_steps": 1000,
        "task_lr_warmup_steps": 20,
        "adapter_learning_rate": 0.1,
        "num_inference_steps": 10,
        "eval_samples_per_class": 500,
        "classifier_steps": 3000,
        "cas_steps_per_class": 240,
    },
    # The paper's CIFAR-100 "20-20" protocol on a GPU: 32x32 RGB, 5 tasks of 20 classes, the 35.7M-parameter UNet of
    # DDPM's CIFAR-10 model (4 levels, 2 layers per block, self-attention at 16x16; 65 convs), EMA, bf16 on CUDA.
    # A starting point: `cos`, the paper's family (on Fashion-MNIST `rshift` ended closer to joint training: try
    # --function rshift), with the adapter settings of the Fashion-MNIST search; the budget is not tuned.
    "cifar100": {
        "dataset_name": "uoft-cs/cifar100",
        "image_column": "img",
        "label_column": "fine_label",
        "resolution": 32,
        "classes_per_task": 20,
        "block_out_channels": "128,256,256,256",
        "layers_per_block": 2,
        "attention_level": "1",
        "norm_num_groups": 32,
        "attention_head_dim": 64,
        "function": "cos",
        "num_functions": 10,
        "init_omega": 0.3,
        "train_batch_size": 160,
        "first_task_steps": 30000,
        "learning_rate": 2e-4,
        "lr_warmup_steps": 1000,
        "task_steps": 10000,
        "task_lr_warmup_steps": 200,
        "adapter_learning_rate": 0.1,
        "use_ema": True,
        "ema_max_decay": 0.9999,
        "checkpointing_steps": 2000,
        "num_inference_steps": 20,
        "eval_samples_per_class": 200,
        "classifier_steps": 10000,
        "cas_steps_per_class": 100,
        "on_cuda": {"mixed_precision": "bf16"},  # applied only where CUDA is available
    },
}

# What each recipe's dataset holds, for a script that stands in for it (examples/protocol_speed.py times a recipe on
# random images of its shape): the number of classes (with `classes_per_task`, the number of tasks) and of channels.
RECIPE_DATASETS = {"fashion-mnist": {"classes": 10, "channels": 1}, "cifar100": {"classes": 100, "channels": 3}}


def add_recipe_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="Start from a named recipe's settings (RECIPES in examples/protocol_args.py); flags you pass still "
        "win. fashion-mnist reads /usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist).",
    )


def parse_with_recipe(
    parser: argparse.ArgumentParser, input_args: list[str] | None, quick_defaults: dict | None = None
) -> argparse.Namespace:
    """Parse `input_args`, the chosen recipe's settings taking the place of the defaults of the flags it names.

    `quick_defaults` (a script's `--quick` budget) take the place of the defaults when the parser's `--quick` is set,
    over the recipe's. What the command line names always wins; the parser itself is left unchanged.
    """
    first = parser.parse_known_args(input_args)[0]
    presets = {}
    if first.recipe is not None:
        import torch

        presets = dict(RECIPES[first.recipe])
        on_cuda = presets.pop("on_cuda", {})
        if torch.cuda.is_available():
            presets.update(on_cuda)
    if quick_defaults and getattr(first, "quick", False):
        presets.update(quick_defaults)
    # argparse keeps the values a namespace already holds for the flags the command line does not name.
    declared = vars(first)
    return parser.parse_args(input_args, argparse.Namespace(**{k: v for k, v in presets.items() if k in declared}))


def check_recipe_data(args: argparse.Namespace) -> None:
    """Refuse the Fashion-MNIST folder when the Debian package that provides it is not installed."""
    if args.dataset_name == FASHION_MNIST_DIRECTORY and not is_idx_directory(FASHION_MNIST_DIRECTORY):
        raise ValueError(
            f"--dataset_name={FASHION_MNIST_DIRECTORY} (the fashion-mnist recipe's default) does not hold "
            "Fashion-MNIST: install it with `apt-get install dataset-fashion-mnist` (Debian, Ubuntu), or pass "
            "--dataset_name with a folder holding train-images-idx3-ubyte.gz and the three other IDX files."
        )


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


def data_flags() -> tuple[str, ...]:
    """The flags `add_data_arguments` adds, by their destinations (what the data and the task layout depend on)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_data_arguments(parser, resolution=None)
    return tuple(action.dest for action in parser._actions)


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


def add_unet_arguments(parser: argparse.ArgumentParser, *, block_out_channels: str, from_files: bool = False) -> None:
    """The UNet flags; with `from_files`, also a backbone from a config file or from pretrained weights."""
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
    if not from_files:
        return
    group.add_argument(
        "--model_config_name_or_path",
        type=str,
        default=None,
        help="Build the backbone from this UNet2DModel config instead of the flags above (a config.json file, a "
        "folder holding one, or a Hub model id), freshly initialised with --seed, as diffusers' "
        "train_unconditional.py does: any block layout, e.g. self-attention at several levels.",
    )
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Start the backbone from these pretrained UNet2DModel weights (a folder or a Hub model id; safetensors "
        "only) instead of a fresh one; its config replaces the flags above. It must have no class embedding and as "
        "many image channels as the data.",
    )
    group.add_argument(
        "--model_subfolder",
        type=str,
        default=None,
        help="Subfolder of --model_config_name_or_path / --pretrained_model_name_or_path holding the UNet, e.g. unet.",
    )


def backbone_source(args: argparse.Namespace) -> tuple[str, str] | None:
    """(flag, value) of the file or model the backbone comes from, or None when the UNet flags describe it."""
    for flag in ("pretrained_model_name_or_path", "model_config_name_or_path"):
        if getattr(args, flag, None):
            return flag, getattr(args, flag)
    return None


def _config_from_source(args: argparse.Namespace, num_channels: int, resolution: int) -> dict:
    from diffusers import UNet2DModel

    flag, source = backbone_source(args)
    try:
        loaded = UNet2DModel.load_config(source, subfolder=args.model_subfolder)
    except (OSError, ValueError) as error:
        raise ValueError(f"--{flag}={source!r} holds no readable UNet2DModel config: {error}") from None
    config = {k: v for k, v in loaded.items() if not k.startswith("_")}
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise ValueError(
            f"--{flag}={source!r} is a class-embedding UNet (num_class_embeds={config.get('num_class_embeds')}, "
            f"class_embed_type={config.get('class_embed_type')}): FunLoRA conditions on the class through its "
            "adapters only; pick an unconditional UNet2DModel."
        )
    channels = (config.get("in_channels"), config.get("out_channels"))
    if channels != (num_channels, num_channels):
        raise ValueError(
            f"--{flag}={source!r} maps {channels[0]} to {channels[1]} channels but the images have {num_channels}; "
            "pick a model for this data or convert the images."
        )
    size = config.get("sample_size")
    if isinstance(size, int) and size != resolution:
        raise ValueError(
            f"--{flag}={source!r} has sample_size={size} but the images are {resolution}x{resolution}; pass "
            f"--resolution {size}."
        )
    return config


def initial_unet(args: argparse.Namespace, config: dict, seed: int):
    """The backbone a run starts from: the pretrained weights, or a fresh UNet2DModel(**config) seeded by `seed`."""
    import torch
    from diffusers import UNet2DModel

    if getattr(args, "pretrained_model_name_or_path", None):
        return UNet2DModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder=args.model_subfolder, use_safetensors=True
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**config)


def unet_config_from_args(args: argparse.Namespace, num_channels: int, resolution: int) -> dict:
    """`funlora_peft.continual.training.unet_config` of the UNet flags, or the config of the backbone's source."""
    if backbone_source(args) is not None:
        return _config_from_source(args, num_channels, resolution)
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
# Adapters and the later tasks' schedule
# --------------------------------------------------------------------------------------------------------------------

ADAPTER_INIT_FLAGS = tuple(
    name for name in FunLoRAConfig.__dataclass_fields__ if name.startswith("init_") and name != "init_seed"
)


def add_adapter_init_arguments(group) -> None:
    """`--init_a_std`, `--init_b_std`, `--init_omega`, `--init_alpha`: FunLoRAConfig's fields, its defaults."""
    for name in ADAPTER_INIT_FLAGS:
        field_ = FunLoRAConfig.__dataclass_fields__[name]
        group.add_argument(f"--{name}", type=float, default=field_.default, help=field_.metadata["help"])


def adapter_init_kwargs(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in ADAPTER_INIT_FLAGS}


def add_later_task_arguments(group) -> None:
    """The batch size and warmup of tasks 1, 2, ... (adapters only), when they differ from task 0's."""
    group.add_argument(
        "--task_train_batch_size",
        type=int,
        default=None,
        help="Batch size per device of tasks 1, 2, ... (adapters only); default: --train_batch_size.",
    )
    group.add_argument(
        "--task_lr_warmup_steps",
        type=int,
        default=None,
        help="Warmup steps of tasks 1, 2, ... (adapters only); default: --lr_warmup_steps.",
    )


def task_setting(args: argparse.Namespace, name: str, task: int):
    """`--name` for task 0; for tasks 1, 2, ... `--task_name` when it is set, else `--name` too."""
    override = getattr(args, f"task_{name}")
    return getattr(args, name) if task == 0 or override is None else override


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------


def add_evaluation_arguments(parser: argparse.ArgumentParser, *, eval_samples_per_class: int) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--num_inference_steps", type=int, default=10, help="Euler steps (NFE) of the sampler.")
    group.add_argument(
        "--scheduler_shift",
        type=float,
        default=1.0,
        help="Timestep shift of the sampler (the `shift` of diffusers' FlowMatchEulerDiscreteScheduler): noise level "
        "sigma -> s sigma / (1 + (s - 1) sigma) on the uniform grid, so that s > 1 spends more of the steps near the "
        "noise. 1: the uniform grid. A run folder keeps it in scheduler/, which its pipeline samples with.",
    )
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


# The evaluation flags a real-data classifier's training depends on (the others set the generated samples and CAS).
CLASSIFIER_FLAGS = ("classifier_epochs", "classifier_steps", "classifier_augment")


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
    check_shift(args.scheduler_shift, "--scheduler_shift")
    if args.eval_samples_per_class < 2:
        raise ValueError(
            f"--eval_samples_per_class must be >= 2 (the Frechet distance needs a covariance), got "
            f"{args.eval_samples_per_class}."
        )
