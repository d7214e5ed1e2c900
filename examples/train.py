"""Class-incremental training of a flow-matching UNet2DModel with FunLoRA adapters (one adapter per task).

Task 0 trains the backbone together with task 0's adapter; every later task trains ONLY its own new adapter, on its own
task's data only, with the backbone and all older adapters frozen and absent from the optimizer: the classes of earlier
tasks keep bit-identical outputs. After each task the script writes the run folder (`funlora_peft.run_folder`: the
backbone once, `task_k/`, `funlora.json`, `metrics.json`, `samples/after_task_k.png`, the model card, with
--select_layers `importance.json` and `importance.png`, and resumable `checkpoint-N/` folders) and evaluates the
generator loaded back from that folder with `FunLoRAPipeline.from_pretrained`.

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
accelerate launch examples/train.py --output_dir runs/digits-lr3 --start_from_run runs/digits \
    --adapter_learning_rate 0.3                                              # task 0 of runs/digits, new later tasks
accelerate launch examples/train.py --dataset_name uoft-cs/cifar100 --image_column img --label_column fine_label \
    --resolution 32 --classes_per_task 20 --block_out_channels 128,256,256,256 --layers_per_block 2 \
    --norm_num_groups 32 --first_task_steps 20000 --task_steps 5000 --train_batch_size 128 --mixed_precision bf16
```

Evaluation (`funlora_peft.continual.evaluation.ContinualEvaluator`): a classifier trained once on the real training
images gives the upper bound (`real_data_accuracy`) and the FIXED recognition classifier; after task k the generator's
samples of every class seen so far (per-class seeds, single-class batches) give the CAS (a fresh classifier trained on
the samples only, tested on the real test images), row k of the recognition accuracy matrix and the Frechet distance
in the real classifier's feature space.
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
import protocol_args
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import EMAModel
from peft import get_peft_model
from tqdm.auto import tqdm

import funlora_peft
from funlora_peft import FunLoRAConfig, FunLoRAPipeline, push_to_hub, write_model_card
from funlora_peft.continual import training
from funlora_peft.continual.checkpoint import (
    CHECKPOINT_FILES,
    Checkpointer,
    CheckpointError,
    TrainingState,
    check_checkpoint_tensors,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    thread_count_note,
)
from funlora_peft.continual.evaluation import ContinualEvaluator, ContinualMetrics
from funlora_peft.continual.importance import (
    ImportanceRecord,
    apply_selection,
    compute_layer_importance,
    parse_selection,
    plot_layer_importance,
    probe_layer_importance,
)
from funlora_peft.continual.tasks import task_dataset
from funlora_peft.flow_matching import TIME_DISTRIBUTIONS, flow_matching_loss, t_to_model_timestep
from funlora_peft.pipeline import default_grid_scale, make_image_grid, pipeline_sample_fn
from funlora_peft.run_folder import (
    BACKBONE_SUBFOLDER,
    IMPORTANCE_FILE,
    attach_tasks,
    load_backbone,
    read_importance,
    read_index,
    read_metrics,
    run_outputs,
    save_run,
    task_name,
    write_importance,
    write_metrics,
    write_sample_grid,
)

logger = get_logger(__name__)
SCRIPT = "train.py"


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Class-incremental training of a flow-matching UNet2DModel with FunLoRA adapters.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    protocol_args.add_recipe_argument(parser)
    protocol_args.add_data_arguments(parser, resolution=16)
    protocol_args.add_unet_arguments(parser, block_out_channels="32,64,64", from_files=True)
    funlora = parser.add_argument_group("FunLoRA")
    funlora.add_argument(
        "--function",
        type=str,
        default="cos",
        help=f"FunLoRA function family: one of {sorted(funlora_peft.FUNCTIONS)}.",
    )
    funlora.add_argument("--num_functions", type=int, default=10, help="Number p of functions (1 for 'linear').")
    protocol_args.add_adapter_init_arguments(funlora)
    funlora.add_argument(
        "--target_modules",
        type=str,
        default=None,
        help="Convs to adapt: comma-separated module names or name suffixes as in PEFT (default: every Conv2d).",
    )
    funlora.add_argument(
        "--select_layers",
        type=str,
        default=None,
        help="Adapt only the most important convs in tasks 1, 2, ...: 'top_k=K' or 'fraction=F' (for ablations also "
        "'bottom_k=K', the least important, and 'random_k=K', drawn with --seed). After task 0 the layers are scored "
        "(--importance_source) and the selection is kept; the scores, the selection and importance.png go to "
        "--output_dir. Default: the same convs in every task.",
    )
    funlora.add_argument(
        "--importance_source",
        type=str,
        default="probe",
        choices=("probe", "task0"),
        help="Scores for --select_layers. 'probe': a throwaway adapter on every conv trained on task 1's data with "
        "the task-0 backbone frozen, the regime every later task trains in. 'task0': task 0's own adapters, free, "
        "but trained together with the backbone, which absorbs part of what they would otherwise carry.",
    )
    funlora.add_argument(
        "--importance_probe_steps", type=int, default=50, help="Optimisation steps of the probe (--importance_source)."
    )
    fit = parser.add_argument_group("training")
    fit.add_argument("--output_dir", type=str, default="runs/digits", help="The run folder to write.")
    fit.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start a fresh run even if --output_dir holds a previous run's outputs (they are deleted).",
    )
    fit.add_argument(
        "--start_from_run",
        type=str,
        default=None,
        help="Take the backbone and task 0 of this run folder (same data, task layout and UNet) instead of training "
        "them, and train tasks 1, 2, ... here with this command's flags: several recipes for the later tasks from "
        "one task 0.",
    )
    fit.add_argument("--seed", type=int, default=0, help="Seed of the initialisation, batches, noise and evaluation.")
    fit.add_argument("--train_batch_size", type=int, default=64, help="Batch size per device.")
    protocol_args.add_later_task_arguments(fit)
    fit.add_argument(
        "--class_balanced_batches",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Draw the same number of images of every class of the task in each batch, laid out so that the "
        "adapters run one convolution per conv (the batch size must be a multiple of every task's class count). "
        "--no-class_balanced_batches draws images regardless of their class.",
    )
    fit.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated per optimisation step."
    )
    fit.add_argument("--first_task_steps", type=int, default=300, help="Optimisation steps of task 0.")
    fit.add_argument("--task_steps", type=int, default=100, help="Optimisation steps of every later task.")
    fit.add_argument("--learning_rate", type=float, default=2e-3, help="Learning rate of the backbone (task 0).")
    fit.add_argument(
        "--adapter_learning_rate", type=float, default=1e-1, help="Learning rate of the FunLoRA adapters."
    )
    fit.add_argument(
        "--lr_scheduler",
        default="cosine",
        choices=[kind.value for kind in SchedulerType if kind.value != "piecewise_constant"],
        help="Learning-rate schedule of every task (diffusers' get_scheduler).",
    )
    fit.add_argument("--lr_warmup_steps", type=int, default=50, help="Warmup steps at the start of every task.")
    fit.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    fit.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    fit.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    fit.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    fit.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables it).")
    fit.add_argument(
        "--time_distribution",
        type=str,
        default="uniform",
        choices=list(TIME_DISTRIBUTIONS),
        help="Distribution of the flow time t during training.",
    )
    fit.add_argument("--logit_mean", type=float, default=0.0, help="Mean for --time_distribution logit_normal.")
    fit.add_argument("--logit_std", type=float, default=1.0, help="Std for --time_distribution logit_normal.")
    fit.add_argument(
        "--use_ema",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Keep an EMA of the trained weights; the EMA weights are saved.",
    )
    fit.add_argument("--ema_max_decay", type=float, default=0.999, help="Maximum EMA decay.")
    fit.add_argument("--ema_inv_gamma", type=float, default=1.0, help="Inverse gamma of the EMA warmup.")
    fit.add_argument("--ema_power", type=float, default=3 / 4, help="Power of the EMA warmup.")
    fit.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; default: the value of `accelerate config` / `accelerate launch`.",
    )
    fit.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch CPU threads per process (default: as launched; `accelerate launch` sets OMP_NUM_THREADS).",
    )
    checkpoints = parser.add_argument_group("checkpoints")
    checkpoints.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a resumable checkpoint every this many optimisation steps (and at the end of every task's "
        "training).",
    )
    checkpoints.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints (oldest go)."
    )
    checkpoints.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="Continue from a checkpoint: 'latest' or a checkpoint-N folder (name in --output_dir, or path). Flags "
        "that shape training must equal those of the run that wrote it. Checkpoints hold safetensors and JSON "
        "only, checked against the sha256 recorded when they were written.",
    )
    checkpoints.add_argument(
        "--interrupt_after_steps",
        type=int,
        default=None,
        help="Testing aid: stop the process right after this many optimisation steps over all tasks, leaving the "
        "run unfinished as if it had been killed; continue it with --resume_from_checkpoint latest.",
    )
    protocol_args.add_evaluation_arguments(parser, eval_samples_per_class=100)
    parser.add_argument(
        "--reuse_old_samples",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Sample only the new classes after each task and reuse the evaluation samples of earlier classes (their "
        "adapters and the backbone never change). A few probe samples of every old class are still drawn again and "
        "compared bit for bit (old_samples_identical in metrics.json).",
    )
    logs = parser.add_argument_group("logging and the Hub")
    logs.add_argument("--grid_samples_per_class", type=int, default=10, help="Columns of the sample grids.")
    logs.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help='Trackers for the logs: "tensorboard", "wandb", "all", or "none".',
    )
    logs.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder inside --output_dir.")
    logs.add_argument(
        "--push_to_hub",
        action="store_true",
        help="After every task, push the backbone (first), the task's adapter, the index and the card to the Hub.",
    )
    logs.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id 'user/name' for --push_to_hub.")
    logs.add_argument("--hub_token", type=str, default=None, help="Hub token (default: your saved login).")
    logs.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    return protocol_args.parse_with_recipe(parser, input_args)


# --------------------------------------------------------------------------------------------------------------------
# Validation and setup (nothing is written before all of it succeeded)
# --------------------------------------------------------------------------------------------------------------------


def check_args(args: argparse.Namespace) -> None:
    """Refuse flags that cannot work, naming the flag and the fix."""
    protocol_args.check_at_least(
        args,
        1,
        "resolution",
        "train_batch_size",
        "task_train_batch_size",
        "gradient_accumulation_steps",
        "first_task_steps",
        "task_steps",
        "grid_samples_per_class",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "num_functions",
        "importance_probe_steps",
    )
    protocol_args.check_at_least(args, 1, "num_threads")
    protocol_args.check_at_least(
        args, 0, "lr_warmup_steps", "task_lr_warmup_steps", "max_grad_norm", "adam_weight_decay"
    )
    for flag in ("learning_rate", "adapter_learning_rate", "adam_epsilon"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag}={getattr(args, flag)} must be > 0 (a negative rate would train by ascent).")
    for flag in ("adam_beta1", "adam_beta2", "ema_max_decay"):
        if not 0 <= getattr(args, flag) < 1:
            raise ValueError(f"--{flag}={getattr(args, flag)} must be in [0, 1).")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "--mixed_precision fp16 needs a CUDA GPU (on a CPU it would silently run in fp32); pass bf16 or no."
        )
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise ValueError(f"--output_dir={args.output_dir} is a file; pass a folder for the run.")
    protocol_args.check_evaluation_arguments(args)
    protocol_args.check_recipe_data(args)
    funlora_peft.get_function(args.function)
    if args.resolution is not None and protocol_args.backbone_source(args) is None:
        protocol_args.unet_config_from_args(args, 1, args.resolution)
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        raise ValueError(f"--report_to={args.report_to!r} must be 'tensorboard', 'wandb', 'all' or 'none'.")
    if args.select_layers is not None:
        try:
            parse_selection(args.select_layers)
        except ValueError as error:
            raise ValueError(f"--select_layers: {error}") from None
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id user/name: the Hub repo to push the run to.")
    if args.start_from_run is not None and Path(args.start_from_run).resolve() == Path(args.output_dir).resolve():
        raise ValueError("--start_from_run names --output_dir itself; continue a run with --resume_from_checkpoint.")


def adapter_config(
    args: argparse.Namespace, class_ids: list[int], task: int, selected: list[str] | None = None
) -> FunLoRAConfig:
    """Task `task`'s adapter; tasks after task 0 adapt only the `selected` layers when --select_layers chose them."""
    target_modules = None
    if args.target_modules:
        target_modules = [name.strip() for name in args.target_modules.split(",") if name.strip()]
    if task > 0 and selected is not None:
        target_modules = list(selected)
    return training.task_adapter_config(
        class_ids,
        task,
        args.seed,
        function=args.function,
        num_functions=args.num_functions,
        target_modules=target_modules,
        **protocol_args.adapter_init_kwargs(args),
    )


def run_key(args: argparse.Namespace, tasks: list[list[int]], num_processes: int, mixed_precision: str) -> dict:
    """The settings that determine the training trajectory; a checkpoint only resumes a run with the same ones."""
    keys = (
        "dataset_name image_column label_column resolution block_out_channels layers_per_block attention_level "
        "norm_num_groups attention_head_dim function num_functions init_a_std init_b_std init_omega init_alpha "
        "target_modules select_layers importance_source importance_probe_steps start_from_run seed train_batch_size "
        "task_train_batch_size task_lr_warmup_steps gradient_accumulation_steps first_task_steps task_steps "
        "learning_rate adapter_learning_rate lr_scheduler "
        "lr_warmup_steps adam_beta1 adam_beta2 adam_weight_decay adam_epsilon max_grad_norm time_distribution "
        "logit_mean logit_std use_ema ema_max_decay ema_inv_gamma ema_power class_balanced_batches"
    ).split()
    key = {name: getattr(args, name) for name in keys}
    # The backbone's source, when a file or a model gives it (absent otherwise, so earlier checkpoints still resume).
    for name in ("model_config_name_or_path", "pretrained_model_name_or_path", "model_subfolder"):
        if getattr(args, name) is not None:
            key[name] = getattr(args, name)
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
    metrics: ContinualMetrics = field(default_factory=ContinualMetrics)
    selected: list[str] | None = None  # the layers tasks 1, 2, ... adapt (--select_layers), once chosen


def load_finished_tasks(config: dict, tasks: list[list[int]], upto_task: int, folder: Path) -> torch.nn.Module:
    """The PeftModel of the backbone and tasks 0..upto_task-1 of the run folder `folder`, every file checked."""
    index = read_index(folder)
    unet = load_backbone(folder, index)
    saved = {key: unet.config.get(key) for key in config}
    if json.dumps(saved, sort_keys=True) != json.dumps(config, sort_keys=True):  # tuples and lists alike
        raise CheckpointError(
            f"{folder / BACKBONE_SUBFOLDER} was saved with another UNet configuration than the flags."
        )
    names = [task_name(task) for task in range(upto_task)]
    for task, name in enumerate(names):
        if name not in index.task_names or index.tasks[index.task_names.index(name)].class_ids != tasks[task]:
            raise CheckpointError(
                f"{folder} does not hold {name} with classes {tasks[task]}: it belongs to another run or task layout."
            )
    return attach_tasks(unet, folder, names, index=index)  # sha256, class ids and every tensor checked


def prepare_run(args: argparse.Namespace, accelerator: Accelerator) -> Run:
    """Load the data, cut the tasks, build the model and check the checkpoint, without writing anything."""
    output_dir = Path(args.output_dir)
    data, tasks = protocol_args.load_protocol(args, layout_seed=args.seed)
    for k, task in enumerate(tasks):
        flag = "train_batch_size" if k == 0 or args.task_train_batch_size is None else "task_train_batch_size"
        if args.class_balanced_batches and getattr(args, flag) % len(task):
            raise ValueError(
                f"--{flag}={getattr(args, flag)} is no multiple of the class count of task {k} ({len(task)}), which "
                "--class_balanced_batches needs; pick a multiple of it, or pass --no-class_balanced_batches."
            )
    config = protocol_args.unet_config_from_args(args, data.num_channels, data.resolution)
    key = run_key(args, tasks, accelerator.num_processes, accelerator.mixed_precision)

    checkpoint = None
    if args.resume_from_checkpoint:
        try:
            checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
        except CheckpointError as error:
            raise CheckpointError(f"--resume_from_checkpoint: {error}") from None
        if checkpoint is None:
            logger.info(f"No checkpoint in {output_dir} to resume: starting a new run.")
    previous = run_outputs(output_dir)
    if checkpoint is None and previous and args.resume_from_checkpoint and not args.overwrite_output_dir:
        raise ValueError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint}: {output_dir} holds a previous run "
            f"({', '.join(previous[:6])}) but no checkpoint-N folder to resume from (it stopped before its first "
            "checkpoint). Pass --overwrite_output_dir to start it again, or another --output_dir."
        )
    if checkpoint is None and previous and not args.overwrite_output_dir:
        raise ValueError(
            f"--output_dir={output_dir} holds a previous run ({', '.join(previous[:6])}). Pass "
            "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, or another "
            "--output_dir."
        )
    if checkpoint is None and args.start_from_run is not None:
        if len(tasks) < 2:
            raise ValueError("--start_from_run takes task 0 from another run, but the task layout has one task only.")
        try:
            model = load_finished_tasks(config, tasks, 1, Path(args.start_from_run))
        except ValueError as error:
            raise ValueError(f"--start_from_run: {error}") from None
        start = TrainingState(task=1, task_step=0, global_step=0, run_key=key)
        return Run(data=data, tasks=tasks, model=model, key=key, start=start)
    if checkpoint is None:
        unet = protocol_args.initial_unet(args, config, args.seed)
        model = get_peft_model(unet, adapter_config(args, tasks[0], 0), adapter_name=task_name(0))
        start = TrainingState(task=0, task_step=0, global_step=0, run_key=key)
        return Run(data=data, tasks=tasks, model=model, key=key, start=start)

    start = read_checkpoint(checkpoint, key, required_files=CHECKPOINT_FILES)
    if not 0 <= start.task < len(tasks):
        raise CheckpointError(f"{checkpoint}: task {start.task} is not a task of this run ({len(tasks)} tasks).")
    metrics = ContinualMetrics()
    selected = None
    if start.task > 0:
        metrics = read_metrics(output_dir)
        rows = [] if metrics is None else metrics.tasks[: start.task]
        if [row.class_ids for row in rows] != tasks[: start.task]:
            raise CheckpointError(
                f"Resuming at task {start.task} needs the metrics of tasks 0..{start.task - 1} in {output_dir}; "
                "the run folder lacks them or they belong to another task layout."
            )
        metrics.tasks = rows
        if args.select_layers:
            importance = read_importance(output_dir)
            if importance is None:
                raise CheckpointError(
                    f"{output_dir / IMPORTANCE_FILE} is missing: the layers of tasks 1, 2, ... were chosen after "
                    "task 0 and saved there. Restore it, or start a new run with --overwrite_output_dir."
                )
            selected = importance.selected
        model = load_finished_tasks(config, tasks, start.task, output_dir)
        model.add_adapter(task_name(start.task), adapter_config(args, tasks[start.task], start.task, selected))
    else:
        unet = UNet2DModel(**config)
        model = get_peft_model(unet, adapter_config(args, tasks[0], 0), adapter_name=task_name(0))
        if "backbone.safetensors" not in start.files:
            raise CheckpointError(f"{checkpoint} is incomplete: a task-0 checkpoint holds backbone.safetensors.")
    ema_names = training.trainable_parameter_names(model, start.task) if args.use_ema else []
    check_checkpoint_tensors(checkpoint, model, task_name(start.task), start.task == 0, ema_names)
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
    adapter_name = task_name(task)
    if adapter_name not in model.peft_config:
        model.add_adapter(adapter_name, adapter_config(args, run.tasks[task], task, run.selected))
        model.to(device)
    names = training.set_trainable(model, task)
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    groups = training.optimizer_groups(
        model, task, learning_rate=args.learning_rate, adapter_learning_rate=args.adapter_learning_rate
    )
    optimizer = torch.optim.AdamW(
        groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon
    )
    num_steps = args.first_task_steps if task == 0 else args.task_steps
    # Accelerate steps a prepared scheduler once per process per optimisation step, as in diffusers' scripts.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=protocol_args.task_setting(args, "lr_warmup_steps", task) * accelerator.num_processes,
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
    global_batch = protocol_args.task_setting(args, "train_batch_size", task) * accelerator.num_processes
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
            batch = training.draw_training_batch(
                images,
                labels,
                global_batch,
                training.step_generator(args.seed, task, task_step, micro_step),
                process_index=accelerator.process_index,
                num_processes=accelerator.num_processes,
                time_distribution=args.time_distribution,
                logit_mean=args.logit_mean,
                logit_std=args.logit_std,
                class_balanced=args.class_balanced_batches,
                class_order=run.tasks[task],
            )
            with accelerator.accumulate(ddp_model):
                prediction = ddp_model(
                    batch.x_t.to(device),
                    t_to_model_timestep(batch.t).to(device),
                    # CPU labels: the adapters' routing is planned on the host, with no device synchronisation
                    class_labels=batch.class_labels,
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
        # Every process stops at the same step, before a checkpoint keeps weights a diverged step has ruined; one
        # transfer to the host per step, as before, carries every process's loss.
        losses = accelerator.gather(loss.detach().reshape(1)).cpu()
        training.check_loss(losses, task, task_step)
        loss_value = losses[accelerator.process_index].item()
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
                    cpu_threads=torch.get_num_threads() if accelerator.device.type == "cpu" else None,
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


# --------------------------------------------------------------------------------------------------------------------
# Outputs (main process)
# --------------------------------------------------------------------------------------------------------------------


def write_task_outputs(
    args: argparse.Namespace,
    accelerator: Accelerator,
    run: Run,
    evaluator: ContinualEvaluator,
    task: int,
    result: TaskResult | None,
    global_step: int,
) -> None:
    """Save the task's adapter (and the backbone with task 0), evaluate the run folder, write metrics, grid, card."""
    output_dir, model = Path(args.output_dir), run.model
    adapter_name = task_name(task)
    started = time.perf_counter()
    save_run(
        model,
        output_dir,
        [adapter_name],
        save_backbone_weights=task == 0 or result is None,
        class_names=dict(enumerate(run.data.class_names)),
        # The sampler the evaluation uses, kept so that the folder's pipeline draws the same samples.
        scheduler=FlowMatchEulerDiscreteScheduler(shift=args.scheduler_shift),
    )
    pipe = FunLoRAPipeline.from_pretrained(output_dir).to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    row, grid = evaluator.evaluate(pipeline_sample_fn(pipe, args.num_inference_steps), task)
    row.eval_seconds = round(time.perf_counter() - started, 2)
    row.extra_parameters_per_class = training.adapter_parameter_count(model, adapter_name) // len(run.tasks[task])
    if result is not None:
        row.train_steps = result.num_steps
        row.train_seconds = round(result.train_seconds, 2)
        row.final_loss = result.final_loss
        row.trainable_parameters = sum(p.numel() for p in result.params)
    run.metrics.add(row)
    write_metrics(output_dir, run.metrics)
    picture = make_image_grid(grid, rows=len(row.seen_class_ids), scale=default_grid_scale(run.data.resolution))
    write_sample_grid(output_dir, adapter_name, picture)
    write_model_card(output_dir, repo_id=args.hub_model_id)
    if args.push_to_hub:
        push_to_hub(
            output_dir,
            args.hub_model_id,
            tasks=[adapter_name],
            token=args.hub_token,
            private=args.hub_private_repo or None,
        )

    accelerator.log(
        {"cas": row.cas, "recognition": row.recognition, "fd": row.fd, "forgetting": run.metrics.forgetting},
        step=global_step,
    )
    if args.report_to in ("tensorboard", "all"):
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("samples", np.asarray(picture), task, dataformats="HW" if picture.mode == "L" else "HWC")
    trained = "taken from --start_from_run" if result is None else f"train {result.train_seconds:.1f}s"
    trained += "" if result is None else f" ({result.num_steps} steps)"
    accelerator.print(
        f"task {task} {run.tasks[task]} | CAS {row.cas:.4f} | recognition per task "
        f"{[round(a, 4) for a in row.accuracy_per_task]} | FD {row.fd:.3f} | forgetting "
        f"{run.metrics.forgetting:.4f} | {trained} | eval {row.eval_seconds:.1f}s"
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
            scores = compute_layer_importance(model, adapter_names=[task_name(0)])
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
        selected = apply_selection(scores, args.select_layers, seed=args.seed)
        record = ImportanceRecord(
            select_layers=args.select_layers,
            source=args.importance_source,
            detail=detail,
            scores=scores,
            selected=selected,
            seconds=round(time.perf_counter() - started, 2),
        )
        figure = plot_layer_importance(scores, selected=selected, title=f"Layer importance ({detail})")
        write_importance(output_dir, record, plot=figure)
        logger.info(
            f"--select_layers {args.select_layers}: {len(selected)} of {len(scores)} convs from {detail} "
            f"({record.seconds:.1f}s): {selected}"
        )
    accelerator.wait_for_everyone()
    return read_importance(output_dir).selected


def main(args: argparse.Namespace) -> None:
    try:
        check_args(args)  # before the Accelerator: some flags (mixed precision, threads) configure it
    except (ValueError, TypeError) as error:
        raise protocol_args.script_error(SCRIPT, error) from None
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
        raise protocol_args.script_error(SCRIPT, error) from None
    # Every process checks the output folder before the main process writes into it.
    accelerator.wait_for_everyone()

    if accelerator.is_main_process and run.checkpoint is None and args.overwrite_output_dir:
        for name in run_outputs(output_dir) + [args.logging_dir]:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if report_to is not None:
        tracker_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers("funlora", config=tracker_config)
    logger.info(f"Task layout: {run.tasks}; {accelerator.num_processes} process(es) on {accelerator.device}.")
    if run.checkpoint is not None:
        logger.info(f"Resuming from {run.checkpoint}: task {run.start.task}, step {run.start.task_step}.")
        note = thread_count_note(run.start, accelerator.device.type, torch.get_num_threads())
        if note is not None:
            logger.warning(f"Resuming from {run.checkpoint}: {note}")

    evaluator = None
    if accelerator.is_main_process:
        evaluator = ContinualEvaluator(
            run.data,
            run.tasks,
            seed=args.seed,
            grid_columns=args.grid_samples_per_class,
            reuse_old_samples=args.reuse_old_samples,
            **protocol_args.evaluator_kwargs(args),
        )
        logger.info(
            f"Real-data classifier: accuracy {evaluator.real_data_accuracy:.4f} ({evaluator.classifier_seconds:.1f}s)"
        )
        run.metrics.dataset = run.data.name
        run.metrics.function, run.metrics.num_functions = args.function, args.num_functions
        run.metrics.task_layout, run.metrics.real_data_accuracy = run.tasks, evaluator.real_data_accuracy
    hooks = Checkpointer(accelerator)
    run.model.to(accelerator.device)
    global_step = run.start.global_step
    if args.start_from_run and run.checkpoint is None:  # task 0 is taken from another run, then evaluated here
        if accelerator.is_main_process:
            write_task_outputs(args, accelerator, run, evaluator, 0, None, global_step)
        accelerator.wait_for_everyone()
    for task in range(run.start.task, len(run.tasks)):
        if task > 0 and args.select_layers and run.selected is None:
            run.selected = select_layers(args, accelerator, run)
        try:
            global_step, result = train_task(args, accelerator, run, hooks, task, global_step)
        except training.TrainingDiverged as error:
            flags = ["learning_rate", "adapter_learning_rate"] if task == 0 else ["adapter_learning_rate"]
            after = (
                " and train again into a new --output_dir (or with --overwrite_output_dir): its checkpoints keep the "
                "rates they were made with"
            )
            raise protocol_args.diverged_error(SCRIPT, error, args, flags, after) from None
        if result is None:  # --interrupt_after_steps
            accelerator.end_training()
            return
        if accelerator.is_main_process:
            write_task_outputs(args, accelerator, run, evaluator, task, result, global_step)
        accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        final = run.metrics.tasks[-1]
        accelerator.print(
            f"done: {len(run.tasks)} tasks | final CAS {final.cas:.4f} (real data "
            f"{run.metrics.real_data_accuracy:.4f}) | recognition {final.recognition:.4f} | forgetting "
            f"{run.metrics.forgetting:.4f} | {output_dir}"
        )
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
