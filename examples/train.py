"""Class-incremental training of a flow-matching UNet2DModel with FunLoRA adapters (one adapter per task).

Task 0 trains the backbone together with task 0's adapter; every later task trains ONLY its own new adapter, on its own
task's data only, with the backbone and all older adapters frozen and absent from the optimizer: the classes of earlier
tasks keep bit-identical outputs. After each task the script writes the run folder read by
`FunLoRAPipeline.from_pretrained` and evaluates the generator from that folder:

```
output_dir/
  funlora.json                    index of the run (tasks, class ids, sha256 of every safetensors file)
  backbone/                       UNet2DModel, diffusers format (safetensors), written once after task 0
  task_0/, task_1/, ...           adapter_config.json + adapter_model.safetensors of each task
  samples/after_task_k.png        one row of samples per class seen so far
  metrics.json                    real-data accuracy, then per task: CAS, recognition accuracy per task, FD, ...
  importance.json, importance.png with --select_layers: the layer scores I_l, the chosen convs, their bar plot
  README.md                       model card (funlora_peft.model_card)
  logs/                           tensorboard
  checkpoint-N/                   resumable training state (accelerate), written atomically
```

Commands (from the repository root). With no flag at all the script runs the embedded digits protocol: scikit-learn's
digits at 16x16, 5 tasks of 2 classes, a 1.1M-parameter UNet, cos FunLoRA with p = 10 on all 35 convs (4,990 extra
parameters per class). On 2 shared CPU cores (one torch thread, as `accelerate launch` sets it) it took 7 min 15 s
and ended with CAS 0.953 over the 10 classes (real data: 0.989), recognition accuracy 0.961 and forgetting 0.0:

```bash
accelerate launch examples/train.py
accelerate launch examples/train.py --output_dir runs/digits-rshift --function rshift
accelerate launch --multi_gpu --num_processes 2 examples/train.py --output_dir runs/ddp      # 2 GPUs, or gloo on CPU
accelerate launch examples/train.py --resume_from_checkpoint latest         # continue a killed run where it stopped
accelerate launch examples/train.py --output_dir runs/digits-top10 --select_layers top_k=10   # later tasks: 10 convs
accelerate launch examples/train.py --dataset_name uoft-cs/cifar100 --image_column img --label_column fine_label \
    --resolution 32 --classes_per_task 20 --block_out_channels 128,256,256,256 --layers_per_block 2 \
    --norm_num_groups 32 --first_task_steps 20000 --task_steps 5000 --train_batch_size 128 --mixed_precision bf16
```

Evaluation (`funlora_peft.continual.evaluation`): a classifier trained once on the real training images gives the upper bound
(`real_data_accuracy`) and the FIXED recognition classifier; after task k the generator's samples of every class seen
so far (per-class seeds, single-class batches, sampled with a `FunLoRAPipeline` loaded from the output folder) give the
CAS (a fresh classifier trained on the samples only, tested on the real test images), row k of the recognition
accuracy matrix and the Frechet distance in the real classifier's feature space.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from peft import get_peft_model, set_peft_model_state_dict
from tqdm.auto import tqdm

import funlora_peft
from funlora_peft import FunLoRAConfig, push_to_hub, write_model_card
from funlora_peft.continual.data import load_image_classification_data, make_task_layout, task_dataset
from funlora_peft.continual.evaluation import (
    AccuracyMatrix,
    evaluate_stage,
    generate_per_class,
    predict,
    train_classifier,
)
from funlora_peft.continual.importance import (
    IMPORTANCE_FILE,
    IMPORTANCE_PLOT,
    compute_layer_importance,
    parse_selection,
    plot_layer_importance,
    probe_layer_importance,
    read_importance,
    select_target_modules,
)
from funlora_peft.continual.training import (
    ADAPTER_PREFIX,
    CHECKPOINT_FILES,
    CHECKPOINT_PREFIX,
    Checkpointer,
    CheckpointError,
    TrainingState,
    adapter_parameter_count,
    check_checkpoint_tensors,
    draw_training_batch,
    make_image_grid,
    pipeline_sample_fn,
    read_checkpoint,
    resolve_checkpoint,
    save_adapter,
    save_backbone,
    save_checkpoint,
    step_generator,
    tensor_sha256,
    write_json_atomic,
)
from funlora_peft.flow_matching import TIME_DISTRIBUTIONS, flow_matching_loss, t_to_model_timestep
from funlora_peft.pipeline import FunLoRAPipeline
from funlora_peft.run_folder import (
    BACKBONE_SUBFOLDER,
    INDEX_FILE,
    TaskEntry,
    load_backbone,
    read_adapter,
    read_index,
    write_index,
)
from funlora_peft.tuner.model import check_adapter_state_dict

logger = get_logger(__name__)

METRICS_FILE = "metrics.json"
SAMPLES_SUBFOLDER = "samples"


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Class-incremental training of a flow-matching UNet2DModel with FunLoRA adapters.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Data and task layout
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Dataset: None or 'digits' (scikit-learn's digits, embedded, no download), a Hugging Face Hub dataset "
        "name (e.g. 'uoft-cs/cifar100') or a local imagefolder directory (one sub-folder of images per class).",
    )
    parser.add_argument("--image_column", type=str, default="image", help="Column holding the images (Hub datasets).")
    parser.add_argument("--label_column", type=str, default="label", help="Column holding the class labels.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Cache directory of the `datasets` library.")
    parser.add_argument("--resolution", type=int, default=16, help="Images are resized to resolution x resolution.")
    parser.add_argument(
        "--classes_per_task", type=int, default=2, help="Classes per task (and in task 0 unless --first_task_classes)."
    )
    parser.add_argument("--first_task_classes", type=int, default=None, help="Classes in task 0 (default: as others).")
    parser.add_argument(
        "--class_order",
        type=str,
        default=None,
        help="Order in which classes arrive: 'sorted' (default), 'shuffle' (seeded by --seed) or a comma-separated "
        "list of class ids such as '3,1,2,0' (classes not listed are left out).",
    )
    # UNet
    parser.add_argument(
        "--block_out_channels", type=str, default="32,64,64", help="Channels of each UNet level, comma-separated."
    )
    parser.add_argument("--layers_per_block", type=int, default=1, help="ResNet layers per UNet block.")
    parser.add_argument(
        "--attention_level",
        type=str,
        default="last",
        help="UNet level (0 = full resolution) whose blocks get self-attention: an index, 'last' (the lowest "
        "resolution) or 'none'.",
    )
    parser.add_argument("--norm_num_groups", type=int, default=8, help="GroupNorm groups; must divide every width.")
    parser.add_argument("--attention_head_dim", type=int, default=8, help="Channels per attention head.")
    # FunLoRA
    parser.add_argument(
        "--function",
        type=str,
        default="cos",
        help=f"FunLoRA function family: one of {sorted(funlora_peft.FUNCTIONS)}.",
    )
    parser.add_argument("--num_functions", type=int, default=10, help="Number p of functions (1 for 'linear').")
    parser.add_argument(
        "--target_modules",
        type=str,
        default=None,
        help="Convs to adapt: comma-separated module names or name suffixes as in PEFT (default: every Conv2d).",
    )
    parser.add_argument(
        "--select_layers",
        type=str,
        default=None,
        help="Adapt only the most important convs in tasks 1, 2, ...: 'top_k=K' or 'fraction=F'. After task 0 the "
        "layers are scored (--importance_source) and the K (or F of all) with the largest |I_l| are kept; the "
        "scores, the selection and importance.png go to --output_dir. Default: the same convs in every task.",
    )
    parser.add_argument(
        "--importance_source",
        type=str,
        default="probe",
        choices=("probe", "task0"),
        help="Scores for --select_layers. 'probe': a throwaway adapter on every conv trained on task 1's data with "
        "the task-0 backbone frozen, the regime every later task trains in. 'task0': task 0's own adapters, free, "
        "but trained together with the backbone, which absorbs part of what they would otherwise carry.",
    )
    parser.add_argument(
        "--importance_probe_steps", type=int, default=50, help="Optimisation steps of the probe (--importance_source)."
    )
    # Training
    parser.add_argument("--output_dir", type=str, default="runs/digits", help="The run folder to write.")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start a fresh run even if --output_dir holds a previous run's outputs (they are deleted).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the initialisation, batches, noise and evaluation."
    )
    parser.add_argument("--train_batch_size", type=int, default=64, help="Batch size per device.")
    parser.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated per optimisation step."
    )
    parser.add_argument("--first_task_steps", type=int, default=300, help="Optimisation steps of task 0.")
    parser.add_argument("--task_steps", type=int, default=100, help="Optimisation steps of every later task.")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="Learning rate of the backbone (task 0).")
    parser.add_argument(
        "--adapter_learning_rate", type=float, default=1e-1, help="Learning rate of the FunLoRA adapters."
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="cosine",
        help='Scheduler of every task: "linear", "cosine", "cosine_with_restarts", "polynomial", "constant" or '
        '"constant_with_warmup".',
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=50, help="Warmup steps at the start of every task.")
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    parser.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables it).")
    parser.add_argument(
        "--time_distribution",
        type=str,
        default="uniform",
        choices=list(TIME_DISTRIBUTIONS),
        help="Distribution of the flow time t during training.",
    )
    parser.add_argument("--logit_mean", type=float, default=0.0, help="Mean for --time_distribution logit_normal.")
    parser.add_argument("--logit_std", type=float, default=1.0, help="Std for --time_distribution logit_normal.")
    parser.add_argument(
        "--use_ema", action="store_true", help="Keep an EMA of the trained weights; the EMA weights are saved."
    )
    parser.add_argument("--ema_max_decay", type=float, default=0.999, help="Maximum EMA decay.")
    parser.add_argument("--ema_inv_gamma", type=float, default=1.0, help="Inverse gamma of the EMA warmup.")
    parser.add_argument("--ema_power", type=float, default=3 / 4, help="Power of the EMA warmup.")
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; default: the value of `accelerate config` / `accelerate launch`.",
    )
    parser.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch CPU threads per process (default: as launched; `accelerate launch` sets OMP_NUM_THREADS).",
    )
    # Checkpoints
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a resumable checkpoint every this many optimisation steps (and at the end of every task's "
        "training).",
    )
    parser.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints (oldest go)."
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="Continue from a checkpoint: 'latest' or a checkpoint-N folder (name in --output_dir, or path). Flags "
        "that shape training must equal those of the run that wrote it. Checkpoints hold safetensors and JSON "
        "only, checked against the sha256 recorded when they were written.",
    )
    parser.add_argument(
        "--interrupt_after_steps",
        type=int,
        default=None,
        help="Testing aid: stop the process right after this many optimisation steps over all tasks, leaving the "
        "run unfinished as if it had been killed; continue it with --resume_from_checkpoint latest.",
    )
    # Evaluation and logging
    parser.add_argument("--num_inference_steps", type=int, default=10, help="Euler steps (NFE) of the sampler.")
    parser.add_argument("--eval_samples_per_class", type=int, default=100, help="Generated samples per class.")
    parser.add_argument("--grid_samples_per_class", type=int, default=10, help="Columns of the sample grids.")
    parser.add_argument(
        "--classifier_epochs", type=int, default=15, help="Epochs of the real-data and of every CAS classifier."
    )
    parser.add_argument(
        "--classifier_augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Random shifts when training the real-data and CAS classifiers.",
    )
    parser.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help='Trackers for the logs: "tensorboard", "wandb", "all", or "none".',
    )
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder inside --output_dir.")
    parser.add_argument(
        "--push_to_hub",
        action="store_true",
        help="After every task, push the backbone (first), the task's adapter, the index and the card to the Hub.",
    )
    parser.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id 'user/name' for --push_to_hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (default: your saved login).")
    parser.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    return parser.parse_args(input_args)


# --------------------------------------------------------------------------------------------------------------------
# Validation and setup (nothing is written before all of it succeeded)
# --------------------------------------------------------------------------------------------------------------------


def _int_list(flag: str, value: str) -> list[int]:
    try:
        return [int(item) for item in value.split(",")]
    except ValueError:
        raise ValueError(f"{flag}={value!r} must be a comma-separated list of integers, e.g. 32,64,64.") from None


def check_args(args: argparse.Namespace) -> None:
    """Refuse flags that cannot work, naming the flag and the fix."""
    for flag in (
        "resolution",
        "train_batch_size",
        "gradient_accumulation_steps",
        "first_task_steps",
        "task_steps",
        "layers_per_block",
        "attention_head_dim",
        "grid_samples_per_class",
        "checkpointing_steps",
        "num_inference_steps",
        "classifier_epochs",
        "num_functions",
        "norm_num_groups",
        "importance_probe_steps",
    ):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if args.eval_samples_per_class < 2:
        raise ValueError(
            f"--eval_samples_per_class must be >= 2 (the Frechet distance needs a covariance), got "
            f"{args.eval_samples_per_class}."
        )
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1 or unset, got {args.checkpoints_total_limit}.")
    funlora_peft.get_function(args.function)
    channels = _int_list("--block_out_channels", args.block_out_channels)
    bad = [c for c in channels if c < 1 or c % args.norm_num_groups]
    if bad:
        raise ValueError(
            f"--block_out_channels={args.block_out_channels}: widths {bad} do not divide by --norm_num_groups="
            f"{args.norm_num_groups}; pick widths that are multiples of it."
        )
    if args.resolution % 2 ** (len(channels) - 1):
        raise ValueError(
            f"--resolution={args.resolution} must divide by 2^(levels - 1) = {2 ** (len(channels) - 1)} for "
            f"{len(channels)} UNet levels; change --resolution or --block_out_channels."
        )
    attention_level(args, len(channels))
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        raise ValueError(f"--report_to={args.report_to!r} must be 'tensorboard', 'wandb', 'all' or 'none'.")
    if args.select_layers is not None:
        parse_selection(args.select_layers)
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id user/name: the Hub repo to push the run to.")


def attention_level(args: argparse.Namespace, num_levels: int) -> int | None:
    value = args.attention_level
    if value == "none":
        return None
    if value == "last":
        return num_levels - 1
    try:
        level = int(value)
    except ValueError:
        level = -1
    if not 0 <= level < num_levels:
        raise ValueError(f"--attention_level={value!r} must be 'none', 'last' or a level in 0..{num_levels - 1}.")
    return level


def unet_config(args: argparse.Namespace, num_channels: int) -> dict:
    """Keyword arguments of the UNet2DModel (no class embedding: FunLoRA does all the conditioning)."""
    channels = _int_list("--block_out_channels", args.block_out_channels)
    level = attention_level(args, len(channels))
    down = ["AttnDownBlock2D" if i == level else "DownBlock2D" for i in range(len(channels))]
    up = ["AttnUpBlock2D" if len(channels) - 1 - i == level else "UpBlock2D" for i in range(len(channels))]
    return dict(
        sample_size=args.resolution,
        in_channels=num_channels,
        out_channels=num_channels,
        block_out_channels=tuple(channels),
        layers_per_block=args.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=args.norm_num_groups,
        attention_head_dim=args.attention_head_dim,
    )


def adapter_config(
    args: argparse.Namespace, class_ids: list[int], task: int, selected: list[str] | None = None
) -> FunLoRAConfig:
    """Task `task`'s adapter; tasks after task 0 adapt only the `selected` layers when --select_layers chose them."""
    target_modules = None
    if args.target_modules:
        target_modules = [name.strip() for name in args.target_modules.split(",") if name.strip()]
    if task > 0 and selected is not None:
        target_modules = list(selected)
    config = FunLoRAConfig(
        class_ids=list(class_ids),
        function=args.function,
        num_functions=args.num_functions,
        target_modules=target_modules,
        # Per-task seed: a task's initial adapter does not depend on what ran before it (exact resume).
        init_seed=args.seed * 1000 + task,
    )
    return config


def run_key(args: argparse.Namespace, tasks: list[list[int]], num_processes: int, mixed_precision: str) -> dict:
    """The settings that determine the training trajectory; a checkpoint only resumes a run with the same ones."""
    keys = (
        "dataset_name image_column label_column resolution block_out_channels layers_per_block attention_level "
        "norm_num_groups attention_head_dim function num_functions target_modules select_layers importance_source "
        "importance_probe_steps seed train_batch_size "
        "gradient_accumulation_steps first_task_steps task_steps learning_rate adapter_learning_rate lr_scheduler "
        "lr_warmup_steps adam_beta1 adam_beta2 adam_weight_decay adam_epsilon max_grad_norm time_distribution "
        "logit_mean logit_std use_ema ema_max_decay ema_inv_gamma ema_power"
    ).split()
    key = {name: getattr(args, name) for name in keys}
    key["dataset_name"] = key["dataset_name"] or "digits"
    key.update(tasks=tasks, num_processes=num_processes, mixed_precision=mixed_precision)
    return key


@dataclass
class Run:
    """Everything `prepare_run` checked: the data, the task layout, the model and where training starts."""

    data: object
    tasks: list[list[int]]
    model: torch.nn.Module
    key: dict
    start: TrainingState
    checkpoint: Path | None = None
    metrics: dict = field(default_factory=dict)
    selected: list[str] | None = None  # the layers tasks 1, 2, ... adapt (--select_layers), once chosen


def _run_outputs(output_dir: Path) -> list[str]:
    """Names of a previous run's outputs in `output_dir`."""
    if not output_dir.is_dir():
        return []
    names = []
    for path in output_dir.iterdir():
        if path.name in (
            INDEX_FILE,
            METRICS_FILE,
            BACKBONE_SUBFOLDER,
            SAMPLES_SUBFOLDER,
            IMPORTANCE_FILE,
            IMPORTANCE_PLOT,
        ) or (path.is_dir() and (path.name.startswith(CHECKPOINT_PREFIX) or path.name.startswith("task_"))):
            names.append(path.name)
    return sorted(names)


def build_model(
    args, config: dict, tasks: list[list[int]], upto_task: int, output_dir: Path, selected: list[str] | None = None
) -> torch.nn.Module:
    """The PeftModel with adapters task_0..task_{upto_task}; finished tasks (< upto_task) come from `output_dir`."""
    index = None
    if upto_task == 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            unet = UNet2DModel(**config)
    else:
        index = read_index(output_dir)
        unet = load_backbone(output_dir, index)
        saved = {key: unet.config.get(key) for key in config}
        if json.dumps(saved, sort_keys=True) != json.dumps(config, sort_keys=True):  # tuples and lists alike
            raise CheckpointError(
                f"{output_dir / BACKBONE_SUBFOLDER} was saved with another UNet configuration than the flags give."
            )
    model = get_peft_model(unet, adapter_config(args, tasks[0], 0), adapter_name="task_0")
    for task in range(1, upto_task + 1):
        model.add_adapter(f"task_{task}", adapter_config(args, tasks[task], task, selected))
    for task in range(upto_task):
        entry = index.tasks[task]
        _, tensors = read_adapter(output_dir, entry, index)  # sha256 and class ids checked
        problem = check_adapter_state_dict(model, entry.name, tensors)
        if problem is not None:
            raise CheckpointError(f"{output_dir / entry.name}: {problem}")
        set_peft_model_state_dict(model, tensors, adapter_name=entry.name)
    return model


def check_finished_tasks(output_dir: Path, tasks: list[list[int]], upto_task: int) -> dict:
    """Check the outputs of tasks 0..upto_task-1 a resumed run keeps; returns metrics.json (its first rows)."""
    metrics_path = output_dir / METRICS_FILE
    if upto_task == 0:
        return {}
    try:
        index = read_index(output_dir)
        metrics = json.loads(metrics_path.read_text())
        rows = metrics["tasks"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"Resuming at task {upto_task} needs the outputs of tasks 0..{upto_task - 1} in {output_dir} "
            f"({INDEX_FILE}, {METRICS_FILE}): {err}"
        ) from None
    names = [task.name for task in index.tasks]
    for task in range(upto_task):
        if task >= len(index.tasks) or names[task] != f"task_{task}" or index.tasks[task].class_ids != tasks[task]:
            raise CheckpointError(
                f"{output_dir / INDEX_FILE} does not list task_{task} with classes {tasks[task]}: the output folder "
                "does not belong to this checkpoint's run."
            )
        if task >= len(rows) or rows[task].get("class_ids") != tasks[task]:
            raise CheckpointError(f"{metrics_path} lacks the row of finished task {task}.")
    metrics["tasks"] = rows[:upto_task]
    return metrics


def prepare_run(args: argparse.Namespace, accelerator: Accelerator) -> Run:
    """Load the data, cut the tasks, build the model and check the checkpoint, without writing anything."""
    check_args(args)
    output_dir = Path(args.output_dir)
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
        seed=args.seed,
    )
    config = unet_config(args, data.num_channels)
    key = run_key(args, tasks, accelerator.num_processes, accelerator.mixed_precision)

    checkpoint = None
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
        if checkpoint is None:
            logger.info(f"No checkpoint in {output_dir} to resume: starting a new run.")
    previous = _run_outputs(output_dir)
    if checkpoint is None and previous and not args.overwrite_output_dir:
        raise ValueError(
            f"--output_dir={output_dir} holds a previous run ({', '.join(previous[:6])}). Pass "
            "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, or another "
            "--output_dir."
        )
    if checkpoint is None:
        start = TrainingState(task=0, task_step=0, global_step=0, run_key=key)
        model = build_model(args, config, tasks, 0, output_dir)
        return Run(data=data, tasks=tasks, model=model, key=key, start=start)

    start = read_checkpoint(checkpoint, key, required_files=CHECKPOINT_FILES)
    if not 0 <= start.task < len(tasks):
        raise CheckpointError(f"{checkpoint}: task {start.task} is not a task of this run ({len(tasks)} tasks).")
    metrics = check_finished_tasks(output_dir, tasks, start.task)
    selected = None
    if args.select_layers and start.task > 0:
        importance = read_importance(output_dir)
        if importance is None:
            raise CheckpointError(
                f"{output_dir / IMPORTANCE_FILE} is missing: the layers of tasks 1, 2, ... were chosen after task 0 "
                "and saved there. Restore it, or start a new run with --overwrite_output_dir."
            )
        selected = importance["selected"]
    model = build_model(args, config, tasks, start.task, output_dir, selected)
    ema_names = trainable_names(model, start.task) if args.use_ema else []
    if start.task == 0 and "backbone.safetensors" not in start.files:
        raise CheckpointError(f"{checkpoint} is incomplete: a task-0 checkpoint holds backbone.safetensors.")
    check_checkpoint_tensors(checkpoint, model, f"task_{start.task}", start.task == 0, ema_names)
    return Run(
        data=data,
        tasks=tasks,
        model=model,
        key=key,
        start=start,
        checkpoint=checkpoint,
        metrics=metrics,
        selected=selected,
    )


def trainable_names(model: torch.nn.Module, task: int) -> list[str]:
    """Names of the parameters task `task` trains: its adapter, plus the backbone for task 0."""
    suffix = f".task_{task}"
    return [
        n
        for n, _ in model.named_parameters()
        if (ADAPTER_PREFIX in n and n.endswith(suffix)) or (task == 0 and ADAPTER_PREFIX not in n)
    ]


def set_trainable(model: torch.nn.Module, task: int) -> list[str]:
    """Make exactly task `task`'s parameters trainable; PEFT's `set_adapter` handles the adapters only."""
    model.set_adapter(f"task_{task}")
    names = set(trainable_names(model, task))
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return [n for n, _ in model.named_parameters() if n in names]


# --------------------------------------------------------------------------------------------------------------------
# Evaluation (main process)
# --------------------------------------------------------------------------------------------------------------------


class Evaluator:
    """Evaluates the run folder after each task; the real-data classifier is trained once."""

    def __init__(self, args: argparse.Namespace, data, tasks: list[list[int]]) -> None:
        self.args, self.data, self.tasks = args, data, tasks
        self.num_classes = len(data.class_names)
        self.layout_classes = [c for task in tasks for c in task]
        start = time.perf_counter()
        self.classifier = train_classifier(
            data.train_images,
            data.train_labels,
            num_classes=self.num_classes,
            epochs=args.classifier_epochs,
            seed=args.seed,
            augment=args.classifier_augment,
        )
        # When the layout covers every class (the default) this is `evaluation.real_data_accuracy` with the same
        # settings: the same seeded classifier trained on the same images, tested on the same real test images.
        self.real_data_accuracy = self.real_accuracy(self.layout_classes)
        logger.info(
            f"Real-data classifier: accuracy {self.real_data_accuracy:.4f} ({time.perf_counter() - start:.1f}s)"
        )

    def real_accuracy(self, class_ids: list[int]) -> float:
        keep = torch.isin(self.data.test_labels, torch.tensor(class_ids))
        predictions = predict(self.classifier, self.data.test_images[keep], class_ids=class_ids)
        return (predictions == self.data.test_labels[keep]).double().mean().item()

    def __call__(self, output_dir: Path, task: int, device: torch.device) -> tuple[dict, torch.Tensor]:
        """Metrics after task `task` and the sample grid (one row per class seen so far)."""
        args = self.args
        seen_tasks = self.tasks[: task + 1]
        seen = [c for t in seen_tasks for c in t]
        pipe = FunLoRAPipeline.from_pretrained(output_dir).to(device)
        pipe.set_progress_bar_config(disable=True)
        images, labels = generate_per_class(
            pipeline_sample_fn(pipe, args.num_inference_steps), seen, args.eval_samples_per_class, seed=args.seed
        )
        images, labels = images.cpu(), labels.cpu()
        stage = evaluate_stage(
            self.classifier,
            self.data.test_images,
            self.data.test_labels,
            seen_tasks,
            images,
            labels,
            num_classes=self.num_classes,
            seed=args.seed,
            epochs=args.classifier_epochs,
            augment=args.classifier_augment,
        )
        columns = min(args.grid_samples_per_class, args.eval_samples_per_class)
        grid = torch.cat([images[labels == c][:columns] for c in seen])
        row = {
            "task": task,
            "class_ids": self.tasks[task],
            "seen_class_ids": seen,
            "cas": stage.cas,
            "cas_per_task": stage.cas_per_task,
            "real_data_accuracy_seen": self.real_accuracy(seen),
            "recognition": stage.recognition,
            "accuracy_per_task": stage.recognition_per_task,
            "fd": stage.fd,
            "fd_per_task": stage.fd_per_task,
            "samples_sha256": {str(c): tensor_sha256(images[labels == c]) for c in seen},
        }
        return row, (grid + 1) / 2


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    """What training one task produced, for its outputs and metrics row."""

    params: list[torch.nn.Parameter]
    num_steps: int
    train_seconds: float
    final_loss: float | None


def train_task(
    args: argparse.Namespace, accelerator: Accelerator, run: Run, hooks: Checkpointer, task: int, global_step: int
) -> tuple[int, TaskResult | None]:
    """Train task `task` (from the checkpoint when resuming into it); None when --interrupt_after_steps stops it."""
    model, device, output_dir = run.model, accelerator.device, Path(args.output_dir)
    adapter_name = f"task_{task}"
    if adapter_name not in model.peft_config:
        model.add_adapter(adapter_name, adapter_config(args, run.tasks[task], task, run.selected))
        model.to(device)
    names = set_trainable(model, task)
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    groups = [{"params": [named[n] for n in names if ADAPTER_PREFIX in n], "lr": args.adapter_learning_rate}]
    if task == 0:
        groups.insert(0, {"params": [named[n] for n in names if ADAPTER_PREFIX not in n], "lr": args.learning_rate})
    optimizer = torch.optim.AdamW(
        groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon
    )
    num_steps = args.first_task_steps if task == 0 else args.task_steps
    # Accelerate steps a prepared scheduler once per process per optimisation step, as in diffusers' scripts.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=num_steps * accelerator.num_processes,
    )
    ema = None
    if args.use_ema:
        ema = EMAModel(
            params, decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma, power=args.ema_power
        )
    # A new DDP wrapper per task: DDP registers the parameters that require grad when it wraps the model.
    accelerator.free_memory()
    ddp_model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    hooks.configure(
        adapter_name,
        train_backbone=task == 0,
        ema=ema,
        ema_names=names if ema else [],
        model=ddp_model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
    )

    task_step, train_seconds = 0, 0.0
    if run.checkpoint is not None and task == run.start.task:
        hooks.load_state(run.checkpoint)
        task_step, train_seconds = run.start.task_step, run.start.train_seconds
        if ema is not None:
            ema.optimization_step = run.start.ema_optimization_step or 0

    images, labels = task_dataset(run.data, run.tasks[task], split="train").tensors
    global_batch = args.train_batch_size * accelerator.num_processes
    progress = tqdm(
        total=num_steps,
        initial=task_step,
        desc=f"task {task} {run.tasks[task]}",
        disable=not accelerator.is_local_main_process,
    )
    ddp_model.train()
    loss_value = None
    started = time.perf_counter()
    while task_step < num_steps:
        for micro_step in range(args.gradient_accumulation_steps):
            # The step's batch, noise and times depend on (seed, task, step) only: a resumed run replays them.
            batch = draw_training_batch(
                images,
                labels,
                global_batch,
                step_generator(args.seed, task, task_step, micro_step),
                process_index=accelerator.process_index,
                num_processes=accelerator.num_processes,
                time_distribution=args.time_distribution,
                logit_mean=args.logit_mean,
                logit_std=args.logit_std,
            )
            with accelerator.accumulate(ddp_model):
                prediction = ddp_model(
                    batch.x_t.to(device),
                    t_to_model_timestep(batch.t).to(device),
                    class_labels=batch.class_labels.to(device),
                ).sample
                loss = flow_matching_loss(prediction, batch.velocity.to(device))
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        task_step += 1
        global_step += 1
        loss_value = loss.detach().item()
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}")
        accelerator.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[-1], "task": task}, step=global_step)

        # Also at the end of the task's training, before its outputs are written: a kill while they are written
        # resumes from there.
        if global_step % args.checkpointing_steps == 0 or task_step == num_steps:
            if accelerator.is_main_process:
                state = TrainingState(
                    task=task,
                    task_step=task_step,
                    global_step=global_step,
                    train_seconds=train_seconds + time.perf_counter() - started,
                    run_key=run.key,
                    ema_optimization_step=ema.optimization_step if ema is not None else None,
                )
                path = save_checkpoint(hooks, output_dir, state, args.checkpoints_total_limit)
                logger.info(f"Saved {path}")
            accelerator.wait_for_everyone()
        if args.interrupt_after_steps is not None and global_step >= args.interrupt_after_steps:
            progress.close()
            logger.info(f"Interrupted after {global_step} steps (--interrupt_after_steps).")
            return global_step, None
    progress.close()
    train_seconds += time.perf_counter() - started
    # The final weights (the EMA's, if any) become the task's outputs.
    if ema is not None:
        ema.copy_to(params)
    return global_step, TaskResult(params, num_steps, train_seconds, loss_value)


def write_run_index(output_dir: Path, run: Run, upto_task: int) -> None:
    """Index tasks 0..upto_task of the run folder (`funlora.json`), from the adapters' configs."""
    entries = []
    for j in range(upto_task + 1):
        config = run.model.peft_config[f"task_{j}"]
        targets = sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules
        entries.append(TaskEntry(f"task_{j}", list(run.tasks[j]), config.function, config.num_functions, targets))
    write_index(output_dir, entries, dict(enumerate(run.data.class_names)))


def write_task_outputs(
    args: argparse.Namespace,
    accelerator: Accelerator,
    run: Run,
    evaluator: Evaluator,
    metrics: dict,
    task: int,
    result: TaskResult,
    global_step: int,
) -> None:
    """Main process: save the task's adapter (and the backbone after task 0), index the run, evaluate, log."""
    output_dir, tasks = Path(args.output_dir), run.tasks
    model, adapter_name = run.model, f"task_{task}"
    started = time.perf_counter()
    if task == 0:
        save_backbone(model, output_dir / BACKBONE_SUBFOLDER)
    save_adapter(model, adapter_name, output_dir)
    write_run_index(output_dir, run, task)

    row, grid = evaluator(output_dir, task, accelerator.device)
    previous = metrics["tasks"][-1]["samples_sha256"] if metrics["tasks"] else {}
    row.update(
        old_samples_identical=all(row["samples_sha256"][c] == digest for c, digest in previous.items()),
        train_steps=result.num_steps,
        train_seconds=round(result.train_seconds, 2),
        eval_seconds=round(time.perf_counter() - started, 2),
        final_loss=result.final_loss,
        trainable_parameters=sum(p.numel() for p in result.params),
        extra_parameters_per_class=adapter_parameter_count(model, adapter_name) // len(tasks[task]),
    )
    metrics["tasks"] = metrics["tasks"][:task] + [row]
    matrix = AccuracyMatrix()
    for done in metrics["tasks"]:
        matrix.append(done["accuracy_per_task"])
    metrics.update(
        accuracy_matrix=matrix.rows,
        forgetting=matrix.forgetting(),
        average_cas=sum(done["cas"] for done in metrics["tasks"]) / len(metrics["tasks"]),
    )
    write_json_atomic(output_dir / METRICS_FILE, metrics)
    picture = make_image_grid(grid, rows=len(row["seen_class_ids"]), scale=4)
    grid_path = output_dir / SAMPLES_SUBFOLDER / f"after_task_{task}.png"
    picture.save(grid_path.with_name(f".{grid_path.name}"), format="PNG")
    os.replace(grid_path.with_name(f".{grid_path.name}"), grid_path)
    write_model_card(output_dir, repo_id=args.hub_model_id)
    if args.push_to_hub:
        push_to_hub(
            output_dir,
            args.hub_model_id,
            tasks=[adapter_name],
            token=args.hub_token,
            private=args.hub_private_repo or None,
        )

    summary = {"cas": row["cas"], "recognition": row["recognition"], "fd": row["fd"]}
    accelerator.log({**summary, "forgetting": metrics["forgetting"]}, step=global_step)
    if args.report_to in ("tensorboard", "all"):
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("samples", np.asarray(picture), task, dataformats="HW" if picture.mode == "L" else "HWC")
    accelerator.print(
        f"task {task} {tasks[task]} | CAS {row['cas']:.4f} | recognition per task "
        f"{[round(a, 4) for a in row['accuracy_per_task']]} | FD {row['fd']:.3f} | forgetting "
        f"{metrics['forgetting']:.4f} | train {result.train_seconds:.1f}s ({result.num_steps} steps) | eval "
        f"{row['eval_seconds']:.1f}s"
    )


def select_layers(args: argparse.Namespace, accelerator: Accelerator, run: Run) -> list[str]:
    """After task 0: score the convs, keep the most important ones for tasks 1, 2, ... (--select_layers).

    The main process scores and writes importance.json and importance.png; every process then reads the selection
    from that file, so all of them build the same adapters.
    """
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        started = time.perf_counter()
        model = run.model
        if args.importance_source == "task0":
            scores = compute_layer_importance(model, adapter_names=["task_0"])
            detail = "task 0's adapters"
        else:
            dataset = task_dataset(run.data, run.tasks[1], split="train")
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=args.train_batch_size,
                shuffle=True,
                drop_last=len(dataset) > args.train_batch_size,
                generator=torch.Generator().manual_seed(args.seed),
            )
            scores = probe_layer_importance(
                model,
                loader,
                steps=args.importance_probe_steps,
                function=args.function,
                num_functions=args.num_functions,
                class_ids=run.tasks[1],
                learning_rate=args.adapter_learning_rate,
                seed=args.seed,
                target_modules=adapter_config(args, run.tasks[1], 1).target_modules,
                device=accelerator.device,
            )
            detail = f"a probe adapter trained {args.importance_probe_steps} steps on task 1's classes {run.tasks[1]}"
        selected = select_target_modules(scores, **parse_selection(args.select_layers))
        write_json_atomic(
            output_dir / IMPORTANCE_FILE,
            {
                "select_layers": args.select_layers,
                "source": args.importance_source,
                "detail": detail,
                "scores": scores,
                "selected": selected,
                "seconds": round(time.perf_counter() - started, 2),
            },
        )
        plot = output_dir / IMPORTANCE_PLOT
        plot_layer_importance(
            scores, plot.with_name(f".{plot.name}"), selected=selected, title=f"Layer importance ({detail})"
        )
        os.replace(plot.with_name(f".{plot.name}"), plot)
        logger.info(
            f"--select_layers {args.select_layers}: {len(selected)} of {len(scores)} convs from {detail} "
            f"({time.perf_counter() - started:.1f}s): {selected}"
        )
    accelerator.wait_for_everyone()
    return read_importance(output_dir)["selected"]


def main(args: argparse.Namespace) -> None:
    output_dir = Path(args.output_dir)
    report_to = None if args.report_to == "none" else args.report_to
    # `accelerate launch --multi_gpu` on a machine without GPUs starts the processes, but accelerate treats each as a
    # lone process (DistributedType.NO) unless told to run on CPU: then it uses gloo (DistributedType.MULTI_CPU).
    multi_process_without_gpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=multi_process_without_gpu or None,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    for noisy in ("diffusers", "peft", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)

    try:
        run = prepare_run(args, accelerator)
    except (ValueError, TypeError) as error:
        # Bad input: one clear line, before any training step and before anything was written.
        raise SystemExit(f"train.py: error: {error}") from None
    # Every process checks the output folder before the main process writes into it.
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        if run.checkpoint is None and args.overwrite_output_dir:
            for name in _run_outputs(output_dir) + [args.logging_dir]:
                path = output_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        (output_dir / SAMPLES_SUBFOLDER).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    if report_to is not None:
        tracker_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers("funlora", config=tracker_config)
    logger.info(f"Task layout: {run.tasks}; {accelerator.num_processes} process(es) on {accelerator.device}.")
    if run.checkpoint is not None:
        logger.info(f"Resuming from {run.checkpoint}: task {run.start.task}, step {run.start.task_step}.")

    evaluator = Evaluator(args, run.data, run.tasks) if accelerator.is_main_process else None
    metrics = {
        "dataset": run.data.name,
        "function": args.function,
        "num_functions": args.num_functions,
        "task_layout": run.tasks,
        "real_data_accuracy": evaluator.real_data_accuracy if evaluator else None,
        "tasks": run.metrics.get("tasks", []),
    }
    hooks = Checkpointer(accelerator)
    run.model.to(accelerator.device)
    global_step = run.start.global_step
    for task in range(run.start.task, len(run.tasks)):
        if task > 0 and args.select_layers and run.selected is None:
            run.selected = select_layers(args, accelerator, run)
        global_step, result = train_task(args, accelerator, run, hooks, task, global_step)
        if result is None:  # --interrupt_after_steps
            accelerator.end_training()
            return
        if accelerator.is_main_process:
            write_task_outputs(args, accelerator, run, evaluator, metrics, task, result, global_step)
        accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        final = metrics["tasks"][-1]
        accelerator.print(
            f"done: {len(run.tasks)} tasks | final CAS {final['cas']:.4f} (real data "
            f"{metrics['real_data_accuracy']:.4f}) | recognition {final['recognition']:.4f} | forgetting "
            f"{metrics['forgetting']:.4f} | {output_dir}"
        )
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
