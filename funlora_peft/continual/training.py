"""What each task of the continual protocol trains, and the randomness of every training step (method.md §1).

- The backbone: `unet_config` gives the `UNet2DModel` of the protocol (no class embedding: the FunLoRA adapters do
  all the conditioning, with self-attention at one level at most).
- What a task trains: task 0 trains the backbone together with task 0's adapter; every later task k trains ONLY
  adapter `task_k` (`set_trainable`, `optimizer_groups`), with its initialisation seeded by (seed, task) alone
  (`task_adapter_config`).
- Step randomness: every optimisation step draws its batch indices, noise x_0 and times t from a generator seeded by
  `(seed, task, step)` alone, so a resumed run replays exactly the steps an uninterrupted one takes
  (`step_generator`, `draw_training_batch`).
- Divergence: a step whose loss is not finite stops the task (`check_loss`, `TrainingDiverged`) before any later
  step or checkpoint builds on weights a too-large learning rate has ruined.

The training loop is the caller's: with these pieces any loop trains the protocol and resumes exactly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn

from ..flow_matching import make_flow_matching_batch
from ..run_folder import task_name
from ..tuner.config import FunLoRAConfig
from ..tuner.model import FunLoRAModel
from .data import to_model_range

__all__ = [
    "TrainingBatch",
    "TrainingDiverged",
    "adapter_parameter_count",
    "check_loss",
    "draw_training_batch",
    "optimizer_groups",
    "set_trainable",
    "step_generator",
    "task_adapter_config",
    "trainable_parameter_names",
    "unet_config",
]

_ADAPTER_PREFIX = FunLoRAModel.prefix


# --------------------------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------------------------


def unet_config(
    *,
    resolution: int,
    num_channels: int,
    block_out_channels: Sequence[int],
    layers_per_block: int = 1,
    attention_level: int | None = None,
    norm_num_groups: int = 8,
    attention_head_dim: int = 8,
) -> dict:
    """Keyword arguments of the protocol's `UNet2DModel`: no class embedding, self-attention at one level at most.

    Args:
        resolution: image side; must divide by 2^(levels - 1).
        num_channels: image channels (in and out).
        block_out_channels: channels of each level, e.g. (32, 64, 64); each must divide by `norm_num_groups`.
        layers_per_block: ResNet layers per block.
        attention_level: the level (0 = full resolution) whose down and up blocks get self-attention, or None.
        norm_num_groups: GroupNorm groups.
        attention_head_dim: channels per attention head.
    """
    channels = [int(c) for c in block_out_channels]
    if not channels:
        raise ValueError("block_out_channels is empty; pass the channels of each level, e.g. (32, 64, 64).")
    for name, value in (
        ("resolution", resolution),
        ("num_channels", num_channels),
        ("layers_per_block", layers_per_block),
        ("norm_num_groups", norm_num_groups),
        ("attention_head_dim", attention_head_dim),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    bad = [c for c in channels if c < 1 or c % norm_num_groups]
    if bad:
        raise ValueError(
            f"block_out_channels={tuple(channels)}: widths {bad} do not divide by norm_num_groups={norm_num_groups}; "
            "pick widths that are multiples of it."
        )
    levels = len(channels)
    if resolution % 2 ** (levels - 1):
        raise ValueError(
            f"resolution={resolution} must divide by 2^(levels - 1) = {2 ** (levels - 1)} for {levels} UNet levels; "
            "change the resolution or the number of levels."
        )
    if attention_level is not None and not 0 <= attention_level < levels:
        raise ValueError(f"attention_level={attention_level!r} must be None or a level in 0..{levels - 1}.")
    down = ["AttnDownBlock2D" if i == attention_level else "DownBlock2D" for i in range(levels)]
    up = ["AttnUpBlock2D" if levels - 1 - i == attention_level else "UpBlock2D" for i in range(levels)]
    return dict(
        sample_size=resolution,
        in_channels=num_channels,
        out_channels=num_channels,
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
    )


# --------------------------------------------------------------------------------------------------------------------
# What a task trains
# --------------------------------------------------------------------------------------------------------------------


def task_adapter_config(class_ids: Sequence[int], task: int, seed: int, **config) -> FunLoRAConfig:
    """The `FunLoRAConfig` of task `task`, whose initialisation depends on `(seed, task)` only (exact resume).

    `config` holds the other `FunLoRAConfig` fields (function, num_functions, target_modules, init_*).
    """
    return FunLoRAConfig(class_ids=list(class_ids), init_seed=seed * 1000 + task, **config)


def trainable_parameter_names(model: PeftModel, task: int) -> list[str]:
    """Names of the parameters task `task` trains: adapter `task_k`, plus the backbone for task 0."""
    suffix = f".{task_name(task)}"
    return [
        name
        for name, _ in model.named_parameters()
        if (_ADAPTER_PREFIX in name and name.endswith(suffix)) or (task == 0 and _ADAPTER_PREFIX not in name)
    ]


def set_trainable(model: PeftModel, task: int) -> list[str]:
    """Make exactly task `task`'s parameters trainable (`trainable_parameter_names`) and return their names.

    PEFT's `set_adapter` handles the adapters only; the backbone is trainable in task 0 alone.
    """
    model.set_adapter(task_name(task))
    names = trainable_parameter_names(model, task)
    wanted = set(names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)
    return names


def optimizer_groups(model: PeftModel, task: int, *, learning_rate: float, adapter_learning_rate: float) -> list[dict]:
    """The optimizer's parameter groups of task `task`: the backbone (task 0 only) and the task's adapter."""
    named = dict(model.named_parameters())
    names = trainable_parameter_names(model, task)
    groups = [{"params": [named[n] for n in names if _ADAPTER_PREFIX in n], "lr": adapter_learning_rate}]
    if task == 0:
        groups.insert(0, {"params": [named[n] for n in names if _ADAPTER_PREFIX not in n], "lr": learning_rate})
    return groups


def adapter_parameter_count(peft_model: nn.Module, adapter_name: str) -> int:
    """Number of scalars in the tensors of `adapter_name` (all classes, all layers)."""
    suffix = f".{adapter_name}"
    return sum(p.numel() for n, p in peft_model.named_parameters() if _ADAPTER_PREFIX in n and n.endswith(suffix))


# --------------------------------------------------------------------------------------------------------------------
# Step randomness
# --------------------------------------------------------------------------------------------------------------------


def step_generator(seed: int, task: int, step: int, micro_step: int = 0) -> torch.Generator:
    """A CPU generator seeded by `(seed, task, step, micro_step)` only.

    Drawing every step's randomness from its own generator (rather than from one global stream) makes the run
    resumable at any step: step s of task k draws the same batch whether or not the process was restarted before it.
    """
    digest = hashlib.sha256(f"funlora-train/{seed}/{task}/{step}/{micro_step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass
class TrainingBatch:
    """This process's share of one flow-matching training batch (see `funlora_peft.flow_matching`).

    Attributes:
        x_t: `(batch, channels, height, width)` network input (1 - t) x_0 + t x_1.
        t: `(batch,)` flow times in [0, 1].
        velocity: `(batch, channels, height, width)` regression target x_1 - x_0.
        class_labels: `(batch,)` int64 global class ids.
    """

    x_t: torch.Tensor
    t: torch.Tensor
    velocity: torch.Tensor
    class_labels: torch.Tensor


def draw_training_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    global_batch_size: int,
    generator: torch.Generator,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    time_distribution: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    class_balanced: bool = False,
    class_order: Sequence[int] | None = None,
) -> TrainingBatch:
    """Draw the global batch of one step from `generator` and return this process's contiguous slice of it.

    The global batch (`global_batch_size` images, their noise x_0 and times t) is drawn identically on every process,
    so the data a step sees depends only on the generator, not on the process that draws it.

    With `class_balanced`, every class of the task gets the same number of images in every process's share, laid out
    class-interleaved (slot `j * C + c` holds the j-th image of the c-th class of `class_order`): the layout in which
    the FunLoRA adapters run one grouped convolution per conv with no reordering and no padding
    (`funlora_peft.tuner.layer.RoutingPlan`). Otherwise the images are drawn regardless of their class.

    Args:
        images: `(num_images, channels, height, width)` training images x_1 of the current task, in [-1, 1].
        labels: `(num_images,)` their global class ids.
        global_batch_size: images per step over all processes; must divide by `num_processes` (and, with
            `class_balanced`, every process's share by the number of classes).
        generator: the step's generator (`step_generator`).
        process_index, num_processes: this process's rank and the number of processes.
        time_distribution, logit_mean, logit_std: see `funlora_peft.flow_matching.sample_time`.
        class_balanced: draw the same number of images of every class.
        class_order: the order of the classes in the interleaved layout (default: ascending ids); pass the task's
            adapter's `class_ids` so that the layout is the adapter's own.
    """
    if global_batch_size % num_processes:
        raise ValueError(f"global_batch_size={global_batch_size} must divide by num_processes={num_processes}.")
    share = global_batch_size // num_processes
    if class_balanced:
        classes = sorted(torch.unique(labels).tolist()) if class_order is None else [int(c) for c in class_order]
        if share % len(classes):
            raise ValueError(
                f"class-balanced batches need the batch of each process ({share}) to be a multiple of the "
                f"{len(classes)} classes of the task; pick a batch size that is, or draw unbalanced batches."
            )
        per_class = share // len(classes)
        columns = []
        for class_id in classes:
            members = torch.nonzero(labels == class_id).flatten()
            if not len(members):
                raise ValueError(f"class_order names class {class_id}, which has no image among `labels`.")
            columns.append(_draw(members, per_class * num_processes, generator).view(num_processes, per_class))
        index = torch.stack(columns, dim=-1).flatten()  # (process, j, class): slot j * C + c of each share
    else:
        index = _draw(torch.arange(images.shape[0]), global_batch_size, generator)
    batch = make_flow_matching_batch(
        to_model_range(images[index]),
        generator=generator,
        time_distribution=time_distribution,
        logit_mean=logit_mean,
        logit_std=logit_std,
    )
    part = slice(process_index * share, (process_index + 1) * share)
    return TrainingBatch(
        x_t=batch.x_t[part], t=batch.t[part], velocity=batch.velocity[part], class_labels=labels[index][part]
    )


def _draw(members: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` of `members`, without replacement within each pass over them (a pool smaller than `count` repeats,
    each member at most ceil(count / len(members)) times)."""
    repeats = math.ceil(count / len(members))
    order = torch.cat([torch.randperm(len(members), generator=generator) for _ in range(repeats)])[:count]
    return members[order]


# --------------------------------------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------------------------------------


class TrainingDiverged(FloatingPointError):
    """The loss of a training step is not finite: the steps were too large for the weights the task trains.

    Attributes:
        task: the task being trained.
        step: the task's step that gave the loss (1 for its first step).
        loss: the loss, nan or +-inf.
    """

    def __init__(self, task: int, step: int, loss: float) -> None:
        self.task, self.step, self.loss = task, step, loss
        trained = f"the backbone and adapter {task_name(0)}" if task == 0 else f"adapter {task_name(task)} only"
        super().__init__(
            f"training diverged: the loss of task {task} is {loss} at step {step} of the task, which trains "
            f"{trained}: its steps were too large for those weights (the learning rate)."
        )

    def __reduce__(self):  # rebuilt from its fields (a job run in another process reports it)
        return type(self), (self.task, self.step, self.loss)


def check_loss(loss: float | torch.Tensor, task: int, step: int) -> None:
    """Raise `TrainingDiverged` when `loss` (one step's loss, or that step's loss on every process) is not finite."""
    values = torch.as_tensor(loss).detach().to("cpu", torch.float64).flatten()
    bad = values[~torch.isfinite(values)]
    if bad.numel():
        raise TrainingDiverged(task, step, bad[0].item())
