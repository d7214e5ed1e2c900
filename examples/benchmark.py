"""Benchmark: FunLoRA against the alternatives a user would pick, on the same protocol, budget and seeds.

Every method trains the same `UNet2DModel` widths with the same conditional flow-matching loss
(`funlora_peft.flow_matching`) on the same class-incremental task layout, with the same batch size, the same number of
optimisation steps per task and the same per-step batches (`step_generator` of `funlora_peft.continual.training`), and
is scored the same way (`funlora_peft.continual.evaluation.ContinualEvaluator`):

1. `joint`: a class-embedding UNet (`num_class_embeds`) trained once on all classes, the upper bound. Its step budget
   is the total of the continual runs: first_task_steps + (tasks - 1) * task_steps.
2. `finetune`: the class-embedding UNet fine-tuned on each task's data only (catastrophic forgetting).
3. `replay`: generative replay (DGR-style). Before task k >= 1 the previous model generates a pool of samples of every
   old class (as many per class as a new class has real training images, unless --replay_samples_per_class); task k
   trains on its real data plus that pool. The generation time is counted in its training time.
4. `lora1`, `lora4`: PEFT's own LoRA (`peft.LoraConfig`, rank 1 and 4, lora_alpha = rank) on the same convs FunLoRA
   adapts, one adapter per class. Task 0 trains the backbone with its classes' adapters (as FunLoRA does), later tasks
   only their new classes' adapters. PEFT refuses mixed-class `adapter_names` in training mode, so a training batch
   is split into per-class sub-batches (`set_adapter` per class, losses weighted by sub-batch size and summed: the
   same mean loss over the same images); sampling a mixed-class batch uses `adapter_names=`.
5. `funlora-linear`, `funlora-cos`, `funlora-rshift`, `funlora-power`: FunLoRA on every conv (p = 10; 1 for linear),
   trained as `examples/train.py` does: backbone (lr --learning_rate) and task 0's adapter (lr
   --adapter_learning_rate) together in task 0, then only each new task's adapter. `funlora-cos-top15`: the same,
   but tasks >= 1 adapt only the --top_k convs that `funlora_peft.continual.importance` ranks highest from task 0's
   adapter.

Commands (from the repository root). The default is the embedded digits at their native 8x8, 5 tasks of 2 classes,
a 2-level UNet (block_out_channels 32,64), 150 steps on task 0 and 60 on every later task at batch 64, 3 seeds, 2
worker processes of one torch thread each (about 21 minutes on 2 idle CPU cores); `--quick` is one seed with a smaller
budget (about 4 minutes):

```bash
python examples/benchmark.py --output_dir docs/benchmark
python examples/benchmark.py --quick --output_dir runs/benchmark-quick
python examples/benchmark.py --methods funlora-cos,finetune --seeds 0 --output_dir runs/bench-two
python examples/benchmark.py --dataset_name uoft-cs/cifar100 --image_column img --label_column fine_label \
    --resolution 32 --classes_per_task 20 --block_out_channels 64,128,128 --first_task_steps 5000 --task_steps 1000
```

Fashion-MNIST (`apt-get install dataset-fashion-mnist`) with the settings of `train.py --recipe fashion-mnist`
(28x28, a (32, 64, 64) UNet, 600 steps at batch 64 on task 0 and 1,000 at batch 32 on each later task; the published
comparison, docs/benchmark.md, ran at 300, `--task_steps 300`; every method draws its images regardless of their class,
where train.py draws class-balanced batches):

```bash
python examples/benchmark.py --recipe fashion-mnist --task_steps 300 --methods joint,finetune,replay --seeds 0 \
    --num_workers 1 --replay_samples_per_class 500 --output_dir runs/bench-fashion-mnist
```

Outputs in --output_dir: `results.md` (one markdown table, a row per method), `results.json` (the settings, every
run's metrics per task, the summaries) and `accuracy_per_task.png` (CAS after each task, one line per method).
`jobs/` keeps every finished (method, seed) job and each seed's real-data classifier: the same command run again
after a stop runs only the jobs still missing (each file is named after a digest of the flags it was made with, so
runs with other flags, e.g. the points of a sweep, keep theirs side by side in one folder; a classifier's digest
covers only the flags it depends on, so the points of a sweep share it), so a long comparison can be finished over
several sittings, and methods or seeds can be added later. A running job keeps its state after each
finished task in `jobs/partial/` (the model's tensors as safetensors, the rows evaluated so far as JSON) and a job
stopped part way resumes there, ending with the metrics it would have had without the stop; joint training, one
task, starts over. A job whose loss stops being finite (a learning rate too large) ends there: the other jobs go on,
the table names it with the rates to lower, it keeps no result, and the command exits with status 1.

Metrics (per run, then mean +- sample std over seeds): final CAS and average incremental CAS (the mean of the CAS
after each task; `evaluate_stage`), forgetting (`AccuracyMatrix.forgetting` of the per-task recognition accuracy of
the fixed real-data classifier, as in `examples/train.py`), the Frechet distance in that classifier's feature space
after the last task, extra parameters per class (FunLoRA and LoRA: adapter tensors of a class of tasks >= 1;
class-embedding UNets: the class's row of the embedding table, time_embed_dim scalars), training time (all tasks,
generation for replay included), the time to sample 100 images of mixed classes with NFE Euler steps, and the peak
memory (CPU: the peak resident set size of the process that ran the job, one fresh process per job; GPU:
`torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import protocol_args
import torch
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from funlora_peft.continual import training
from funlora_peft.continual.data import to_model_range
from funlora_peft.continual.evaluation import (
    ContinualEvaluator,
    ContinualMetrics,
    SmallClassifier,
    TaskMetrics,
    generate_per_class,
    train_classifier,
)
from funlora_peft.continual.importance import compute_layer_importance, select_target_modules
from funlora_peft.continual.tasks import task_dataset
from funlora_peft.diagnostics import adapter_diagnostics
from funlora_peft.flow_matching import (
    flow_matching_loss,
    num_function_evaluations,
    sample_ode,
    shifted_time_grid,
    t_to_model_timestep,
)
from funlora_peft.run_folder import (
    read_json,
    sha256_of,
    task_name,
    write_file_atomic,
    write_folder_atomic,
    write_json_atomic,
)

RESULTS_MD, RESULTS_JSON, PLOT_FILE = "results.md", "results.json", "accuracy_per_task.png"
JOBS_SUBFOLDER = "jobs"  # one JSON per finished (method, seed) job and one classifier per seed: what a rerun reuses
# jobs/partial/{method}-seed{seed}-{digest}/: a running job's state after its last finished task, removed once the
# job is kept; a job stopped part way resumes from it.
PARTIAL_SUBFOLDER, PARTIAL_TENSORS, PARTIAL_RECORD = "partial", "model.safetensors", "progress.json"
# Flags that change neither what a job computes nor its result.
NOT_JOB_SETTINGS = ("output_dir", "methods", "seeds", "num_workers", "quick", "recipe", "classifier_dir")
# Flags added after jobs were first kept, with the value those jobs ran with: a kept job without the flag matches it.
LATER_FLAGS = {"num_functions": 10, "scheduler_shift": 1.0}
# Of those, the ones added after kept files were named by a digest of their settings: left out of the digest at that
# value, so that the files kept before them keep their names.
UNDIGESTED_FLAGS = ("scheduler_shift",)
SAMPLING_IMAGES = 100


@dataclass(frozen=True)
class Method:
    """One benchmarked method: its command-line key, its table row name and how it is built."""

    key: str
    name: str
    kind: str  # "joint", "finetune", "replay", "lora", "funlora"
    rank: int = 0
    function: str = ""
    num_functions: int | None = None  # None: --num_functions
    top_k: bool = False


METHODS = {
    m.key: m
    for m in (
        Method("joint", "joint training (upper bound)", "joint"),
        Method("finetune", "fine-tuning", "finetune"),
        Method("replay", "generative replay", "replay"),
        Method("lora1", "PEFT LoRA r=1", "lora", rank=1),
        Method("lora4", "PEFT LoRA r=4", "lora", rank=4),
        Method("funlora-linear", "FunLoRA linear", "funlora", function="linear", num_functions=1),
        Method("funlora-cos", "FunLoRA cos", "funlora", function="cos"),
        Method("funlora-rshift", "FunLoRA rshift", "funlora", function="rshift"),
        Method("funlora-power", "FunLoRA power", "funlora", function="power"),
        Method("funlora-cos-top15", "FunLoRA cos (top-15 layers)", "funlora", function="cos", top_k=True),
    )
}
# The quick mode's smaller budget; flags given explicitly still win.
QUICK_DEFAULTS = dict(
    seeds="0", first_task_steps=30, task_steps=10, eval_samples_per_class=16, classifier_epochs=5, lr_warmup_steps=5
)


def num_functions_of(method: Method, args: argparse.Namespace) -> int:
    """p of a FunLoRA method: 1 for `linear`, --num_functions for the others."""
    return args.num_functions if method.num_functions is None else method.num_functions


def row_name(method: Method, args: argparse.Namespace) -> str:
    """The method's row in the table (the top-k row names the --top_k it was run with)."""
    return method.name.replace("top-15", f"top-{args.top_k}") if method.top_k else method.name


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark FunLoRA against joint training, fine-tuning, generative replay and PEFT LoRA.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    protocol_args.add_recipe_argument(parser)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"A few minutes: one seed and a smaller budget ({QUICK_DEFAULTS}); explicit flags still win.",
    )
    parser.add_argument(
        "--output_dir",
        type=str,
        default="runs/benchmark",
        help="Folder of the result files. Every finished (method, seed) job is kept in its jobs/ subfolder, so that a "
        "stopped benchmark run again with the same flags continues where it stopped (a job stopped part way after "
        "the last task it finished).",
    )
    parser.add_argument(
        "--classifier_dir",
        type=str,
        default=None,
        help="Another benchmark folder whose kept real-data classifiers to reuse when this folder has none for a seed "
        "(copied into this folder's jobs/): the points of a sweep kept in folders of their own are then evaluated "
        "by the same classifier as the comparison, e.g. --classifier_dir docs/benchmark/fashion_mnist.",
    )
    parser.add_argument(
        "--methods",
        type=str,
        default="all",
        help=f"Comma-separated methods to run, or 'all': {list(METHODS)}.",
    )
    parser.add_argument("--seeds", type=str, default="0,1,2", help="Comma-separated seeds; every method runs each.")
    parser.add_argument(
        "--num_workers",
        type=int,
        default=2,
        help="Worker processes running (method, seed) jobs in parallel, one fresh process per job. 0 runs the jobs "
        "in this process (then the peak memory is this process's peak so far).",
    )
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads per job.")
    protocol_args.add_data_arguments(parser, resolution=8)
    protocol_args.add_unet_arguments(parser, block_out_channels="32,64")
    # Budget, shared by every method
    parser.add_argument("--train_batch_size", type=int, default=64, help="Images per optimisation step.")
    protocol_args.add_later_task_arguments(parser)
    parser.add_argument("--first_task_steps", type=int, default=150, help="Optimisation steps of task 0.")
    parser.add_argument("--task_steps", type=int, default=60, help="Optimisation steps of every later task.")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="Learning rate of every UNet's weights.")
    parser.add_argument(
        "--adapter_learning_rate", type=float, default=1e-1, help="Learning rate of the FunLoRA adapters."
    )
    parser.add_argument("--lora_learning_rate", type=float, default=1e-2, help="Learning rate of the LoRA adapters.")
    parser.add_argument("--lr_warmup_steps", type=int, default=20, help="Warmup steps of every task's cosine decay.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables it).")
    parser.add_argument(
        "--replay_samples_per_class",
        type=int,
        default=None,
        help="Generated samples per old class in generative replay (default: as many as a class has real training "
        "images, so that the replay pool is class-balanced).",
    )
    parser.add_argument("--top_k", type=int, default=15, help="Convs adapted in tasks >= 1 by funlora-cos-top15.")
    parser.add_argument(
        "--num_functions",
        type=int,
        default=10,
        help="Number p of functions of the cos, rshift and power rows (linear has p = 1).",
    )
    protocol_args.add_adapter_init_arguments(parser.add_argument_group("FunLoRA adapters"))
    protocol_args.add_evaluation_arguments(parser, eval_samples_per_class=40)
    return protocol_args.parse_with_recipe(parser, input_args, QUICK_DEFAULTS)


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


def selected_methods(args: argparse.Namespace) -> tuple[list[Method], list[str]]:
    """The methods to run, and notes for the table (none so far)."""
    notes = []
    if args.methods == "all":
        keys = list(METHODS)
    else:
        keys = [key.strip() for key in args.methods.split(",") if key.strip()]
        unknown = [key for key in keys if key not in METHODS]
        if unknown or not keys:
            raise ValueError(
                f"--methods={args.methods!r}: unknown method(s) {unknown}; pass 'all' or a comma-separated subset of "
                f"{list(METHODS)}."
            )
        if len(set(keys)) != len(keys):
            raise ValueError(f"--methods={args.methods!r} names a method twice; list each method once.")
    return [METHODS[key] for key in keys], notes


def check_args(args: argparse.Namespace) -> None:
    """Refuse flags that cannot work, naming the flag, its value and the fix."""
    protocol_args.check_at_least(
        args, 1, "resolution", "classes_per_task", "train_batch_size", "first_task_steps", "task_steps", "num_threads"
    )
    protocol_args.check_at_least(
        args, 1, "top_k", "replay_samples_per_class", "task_train_batch_size", "num_functions"
    )
    protocol_args.check_at_least(args, 0, "num_workers", "lr_warmup_steps", "task_lr_warmup_steps")
    protocol_args.check_evaluation_arguments(args)
    protocol_args.check_recipe_data(args)
    seeds = protocol_args.int_list("--seeds", args.seeds, "0,1,2")
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds={args.seeds!r} must list distinct non-negative integers, e.g. 0,1,2.")
    if args.resolution is not None:
        protocol_args.unet_config_from_args(args, 1, args.resolution)
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise ValueError(f"--output_dir={args.output_dir} is a file; pass a folder.")
    if args.classifier_dir is not None and not (Path(args.classifier_dir) / JOBS_SUBFOLDER).is_dir():
        raise ValueError(
            f"--classifier_dir={args.classifier_dir} has no {JOBS_SUBFOLDER}/ folder of kept classifiers; pass the "
            "--output_dir of an earlier benchmark run with the same data and classifier flags."
        )
    selected_methods(args)


def load_data(args: argparse.Namespace):
    """The data and the task layout (sorted or explicit class order; a shuffled one is drawn with seed 0)."""
    data, tasks = protocol_args.load_protocol(args, layout_seed=0)
    if len(tasks) < 2:
        raise ValueError(
            f"--classes_per_task={args.classes_per_task} leaves a single task for the {data.num_classes} classes of "
            f"{data.name!r}: a continual benchmark needs at least 2 tasks; lower --classes_per_task."
        )
    return data, tasks


# --------------------------------------------------------------------------------------------------------------------
# The learners: one class per family, all behind the same small interface
# --------------------------------------------------------------------------------------------------------------------


class Learner:
    """A class-conditional velocity model trained task by task.

    `begin_task(k)` prepares task k and returns the optimizer's parameter groups; `loss(x_t, t, velocity, labels)`
    is the flow-matching loss of a batch; `velocity(x_t, t, labels)` evaluates the model (no grad, eval mode) on a
    batch that may mix classes; `sample_single_class` draws samples of one class, as evaluated.
    """

    model: torch.nn.Module

    def __init__(self, args: argparse.Namespace, config: dict, tasks: list[list[int]], seed: int, device) -> None:
        self.args, self.config, self.tasks, self.seed, self.device = args, config, tasks, seed, device

    def begin_task(self, task: int) -> list[dict]:
        raise NotImplementedError

    def end_task(self, task: int) -> None:
        pass

    def loss(self, x_t, t, velocity, labels) -> torch.Tensor:
        prediction = self.model(x_t, t_to_model_timestep(t), class_labels=labels).sample
        return flow_matching_loss(prediction, velocity)

    def velocity(self, x_t, t, labels) -> torch.Tensor:
        return self.model(x_t, t_to_model_timestep(t), class_labels=labels).sample

    def sample_single_class(self, class_id: int, x_0: torch.Tensor) -> torch.Tensor:
        labels = torch.full((x_0.shape[0],), class_id, device=self.device)
        return sample_ode(lambda x, t: self.velocity(x, t, labels), x_0, **self.sampler())

    def sampler(self) -> dict:
        """`sample_ode`'s steps and time grid: the Euler grid `FunLoRAPipeline` integrates with the run's shift."""
        steps = self.args.num_inference_steps
        return {"num_steps": steps, "time_grid": shifted_time_grid(steps, self.args.scheduler_shift)}

    def extra_parameters_per_class(self) -> float:
        raise NotImplementedError

    def progress(self) -> dict:
        """What the learner knows after a task besides its model's tensors (JSON), for `restore`."""
        return {}

    def restore(self, task: int, progress: dict) -> None:
        """Give a fresh learner the modules tasks 0..`task` added and the `progress` they left, before the model's
        tensors are loaded into it: it then stands as after `end_task(task)`."""


def _seeded_unet(config: dict, seed: int, **extra) -> UNet2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**config, **extra)


def conv_names(model: torch.nn.Module) -> list[str]:
    """Module names of every nn.Conv2d: the layers FunLoRA adapts by default, and LoRA's target_modules here."""
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]


class ClassEmbeddingLearner(Learner):
    """A UNet2DModel with a class-embedding table (`num_class_embeds`); every weight trains in every task."""

    def __init__(self, args, config, tasks, seed, device, num_labels: int) -> None:
        super().__init__(args, config, tasks, seed, device)
        self.model = _seeded_unet(config, seed, num_class_embeds=num_labels).to(device)

    def begin_task(self, task: int) -> list[dict]:
        self.model.train()
        return [{"params": list(self.model.parameters()), "lr": self.args.learning_rate}]

    def extra_parameters_per_class(self) -> float:
        return float(self.model.class_embedding.weight.shape[1])


class FunLoRALearner(Learner):
    """FunLoRA as examples/train.py trains it: one adapter per task, backbone trained in task 0 only."""

    def __init__(self, args, config, tasks, seed, device, method: Method) -> None:
        super().__init__(args, config, tasks, seed, device)
        self.method = method
        self.target_modules: list[str] | None = None  # None: every conv
        self.importance: dict | None = None
        # The rank of F_y of each task's adapter before and after its training (mean and max over convs x classes).
        self.rank_per_task: list[dict] = []
        self.model = get_peft_model(_seeded_unet(config, seed), self.adapter_config(0), adapter_name=task_name(0))
        self.model.to(device)

    def adapter_config(self, task: int):
        return training.task_adapter_config(
            self.tasks[task],
            task,
            self.seed,
            function=self.method.function,
            num_functions=num_functions_of(self.method, self.args),
            target_modules=self.target_modules,
            **protocol_args.adapter_init_kwargs(self.args),
        )

    def begin_task(self, task: int) -> list[dict]:
        if task_name(task) not in self.model.peft_config:
            self.model.add_adapter(task_name(task), self.adapter_config(task))
            self.model.to(self.device)
        training.set_trainable(self.model, task)
        self.model.train()
        self.rank_per_task.append({"task": task, "initial": self.rank_of(task, unit_alpha=True)})
        return training.optimizer_groups(
            self.model,
            task,
            learning_rate=self.args.learning_rate,
            adapter_learning_rate=self.args.adapter_learning_rate,
        )

    def rank_of(self, task: int, unit_alpha: bool = False) -> dict:
        """The rank of F_y of `task`'s adapter over its convs x classes (mean, max) and p, its ceiling for rshift.

        `unit_alpha`: with every alpha_i = 1, the rank the initial terms span (an untrained F_y is 0: alpha = 0).
        """
        diagnostics = adapter_diagnostics(self.model, [task_name(task)], unit_alpha=unit_alpha)
        ranks = [r for layer in diagnostics for r in layer.rank]
        p = num_functions_of(self.method, self.args)
        return {"mean": sum(ranks) / len(ranks), "max": max(ranks), "num_functions": p}

    def end_task(self, task: int) -> None:
        self.rank_per_task[-1]["trained"] = self.rank_of(task)
        if task == 0 and self.method.top_k:
            # Rank the convs by task 0's adapter (method.md §4); later tasks adapt only the top-k.
            self.importance = compute_layer_importance(self.model)
            top_k = min(self.args.top_k, len(self.importance))
            self.target_modules = list(select_target_modules(self.importance, top_k=top_k))

    def sample_single_class(self, class_id: int, x_0: torch.Tensor) -> torch.Tensor:
        # As FunLoRAPipeline does: W_y written into the convs for a single-class batch, W0 restored bit-exactly.
        tuner = self.model.base_model
        tuner.merge_adapter(class_label=class_id)
        try:
            return super().sample_single_class(class_id, x_0)
        finally:
            tuner.unmerge_adapter()

    def extra_parameters_per_class(self) -> float:
        counts = [
            training.adapter_parameter_count(self.model, task_name(k)) / len(c) for k, c in enumerate(self.tasks) if k
        ]
        return sum(counts) / len(counts)

    def progress(self) -> dict:
        return {
            "rank_per_task": self.rank_per_task,
            "target_modules": self.target_modules,
            "importance": None if self.importance is None else {k: float(v) for k, v in self.importance.items()},
        }

    def restore(self, task: int, progress: dict) -> None:
        self.rank_per_task = progress["rank_per_task"]
        self.target_modules, self.importance = progress["target_modules"], progress["importance"]
        for k in range(1, task + 1):
            self.model.add_adapter(task_name(k), self.adapter_config(k))
        self.model.to(self.device)


class LoRALearner(Learner):
    """PEFT's LoRA on the same convs, one adapter `class_{c}` per class."""

    def __init__(self, args, config, tasks, seed, device, rank: int) -> None:
        super().__init__(args, config, tasks, seed, device)
        self.rank = rank
        unet = _seeded_unet(config, seed)
        self.targets = conv_names(unet)
        first = tasks[0][0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + first)
            self.model = get_peft_model(unet, self.lora_config(), adapter_name=f"class_{first}").to(device)
        self.trainable: list[torch.nn.Parameter] = []

    def lora_config(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=self.targets, lora_dropout=0.0)

    def add_adapters(self, task: int) -> None:
        for class_id in self.tasks[task]:
            if f"class_{class_id}" not in self.model.peft_config:
                # LoRA's A is random: a per-class seed makes it independent of what ran before.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed * 1000 + class_id)
                    self.model.add_adapter(f"class_{class_id}", self.lora_config())
        self.model.to(self.device)

    def restore(self, task: int, progress: dict) -> None:
        for k in range(task + 1):
            self.add_adapters(k)

    def begin_task(self, task: int) -> list[dict]:
        self.add_adapters(task)
        suffixes = tuple(f".class_{c}.weight" for c in self.tasks[task]) + tuple(
            f".class_{c}.bias" for c in self.tasks[task]
        )
        adapter, backbone = [], []
        for name, param in self.model.named_parameters():
            if "lora_" in name:
                if name.endswith(suffixes):
                    adapter.append(param)
            elif task == 0:
                backbone.append(param)
        self.trainable = adapter + backbone
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.model.train()
        groups = [{"params": adapter, "lr": self.args.lora_learning_rate}]
        if backbone:
            groups.insert(0, {"params": backbone, "lr": self.args.learning_rate})
        return groups

    def _activate(self, class_id: int) -> None:
        # PEFT's set_adapter flips requires_grad of the LoRA tensors; what trains this task is set again after it.
        self.model.base_model.set_adapter(f"class_{class_id}")
        for param in self.trainable:
            param.requires_grad_(True)

    def loss(self, x_t, t, velocity, labels) -> torch.Tensor:
        # adapter_names raises in training mode: one sub-batch per class, weighted so the sum is the batch mean.
        total = 0.0
        for class_id in labels.unique().tolist():
            mask = labels == class_id
            self._activate(class_id)
            prediction = self.model(x_t[mask], t_to_model_timestep(t[mask])).sample
            total = total + flow_matching_loss(prediction, velocity[mask]) * (mask.sum() / labels.numel())
        return total

    def velocity(self, x_t, t, labels) -> torch.Tensor:
        names = [f"class_{c}" for c in labels.tolist()]
        return self.model(x_t, t_to_model_timestep(t), adapter_names=names).sample

    def sample_single_class(self, class_id: int, x_0: torch.Tensor) -> torch.Tensor:
        self.model.base_model.set_adapter(f"class_{class_id}")
        return sample_ode(lambda x, t: self.model(x, t_to_model_timestep(t)).sample, x_0, **self.sampler())

    def extra_parameters_per_class(self) -> float:
        new = [c for task in self.tasks[1:] for c in task]
        counts = []
        for class_id in new:
            suffixes = (f".class_{class_id}.weight", f".class_{class_id}.bias")
            counts.append(
                sum(p.numel() for n, p in self.model.named_parameters() if "lora_" in n and n.endswith(suffixes))
            )
        return sum(counts) / len(counts)


def learning_rate_flags(method: Method, task: int) -> list[str]:
    """The flags (attribute names) of the learning rates that task `task` of `method` trains with."""
    own = {"lora": ["lora_learning_rate"], "funlora": ["adapter_learning_rate"]}.get(method.kind, [])
    backbone = ["learning_rate"] if task == 0 or method.kind in ("joint", "finetune", "replay") else []
    return backbone + own


def make_learner(method: Method, args, config, tasks, seed, device, num_labels: int) -> Learner:
    if method.kind in ("joint", "finetune", "replay"):
        return ClassEmbeddingLearner(args, config, tasks, seed, device, num_labels)
    if method.kind == "lora":
        return LoRALearner(args, config, tasks, seed, device, method.rank)
    return FunLoRALearner(args, config, tasks, seed, device, method)


# --------------------------------------------------------------------------------------------------------------------
# One (method, seed) job
# --------------------------------------------------------------------------------------------------------------------


def train_steps(
    learner: Learner, groups: list[dict], images, labels, batch_sizes: list[int], seed: int, task: int, args
):
    """One AdamW step per entry of `batch_sizes` (its batch size), cosine decay after the task's warmup, on batches
    drawn from `images`; returns seconds."""
    device = learner.device
    num_steps = len(batch_sizes)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    lr_scheduler = get_scheduler(
        "cosine",
        optimizer=optimizer,
        num_warmup_steps=min(protocol_args.task_setting(args, "lr_warmup_steps", task), num_steps // 2),
        num_training_steps=num_steps,
    )
    params = [p for group in groups for p in group["params"]]
    started = time.perf_counter()
    for step, batch_size in enumerate(batch_sizes):
        # The same (seed, task, step) draws the same batch indices, noise and times for every method.
        batch = training.draw_training_batch(images, labels, batch_size, training.step_generator(seed, task, step))
        loss = learner.loss(
            batch.x_t.to(device), batch.t.to(device), batch.velocity.to(device), batch.class_labels.to(device)
        )
        training.check_loss(loss, task, step + 1)  # before its update: nan gradients never reach the optimizer
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


@torch.no_grad()
def sample_fn_of(learner: Learner, data) -> Callable:
    """A `SampleFn` (`funlora_peft.continual.evaluation`): single-class batches, noise from the class's generator."""
    shape = (data.num_channels, data.resolution, data.resolution)

    @torch.no_grad()
    def sample_fn(class_id: int, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        learner.model.eval()
        x_0 = torch.randn(num_samples, *shape, generator=generator).to(learner.device)
        return learner.sample_single_class(class_id, x_0).clamp(-1, 1).cpu()

    return sample_fn


@torch.no_grad()
def time_sampling(learner: Learner, data, class_ids: list[int], seed: int) -> float:
    """Seconds to sample SAMPLING_IMAGES images in ONE batch that cycles through `class_ids`."""
    learner.model.eval()
    generator = torch.Generator().manual_seed(seed)
    x_0 = torch.randn(SAMPLING_IMAGES, data.num_channels, data.resolution, data.resolution, generator=generator)
    labels = torch.tensor([class_ids[i % len(class_ids)] for i in range(SAMPLING_IMAGES)], device=learner.device)
    x_0 = x_0.to(learner.device)
    if learner.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    sample_ode(lambda x, t: learner.velocity(x, t, labels), x_0, **learner.sampler())
    if learner.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def make_evaluator(args: argparse.Namespace, data, tasks, seed: int, classifier_state: dict | None = None):
    """The evaluation of every method with `seed`: one fixed real-data classifier (trained here without a state)."""
    classifier = None
    if classifier_state is not None:
        classifier = SmallClassifier(data.num_channels, len(data.class_names), data.resolution)
        classifier.load_state_dict(classifier_state)
    else:
        classifier = train_classifier(
            data.train_images,
            data.train_labels,
            num_classes=len(data.class_names),
            epochs=args.classifier_epochs,
            steps=args.classifier_steps,
            seed=seed,
            augment=args.classifier_augment,
        )
    return ContinualEvaluator(data, tasks, seed=seed, classifier=classifier, **protocol_args.evaluator_kwargs(args))


def task_batch_sizes(args: argparse.Namespace, task: int) -> list[int]:
    """The batch size of every optimisation step of `task`."""
    steps = args.first_task_steps if task == 0 else args.task_steps
    return [protocol_args.task_setting(args, "train_batch_size", task)] * steps


def run_job(args: argparse.Namespace, method_key: str, seed: int, classifier_state: dict) -> dict:
    """Train and evaluate one method with one seed; returns its metrics (JSON-serialisable)."""
    torch.set_num_threads(args.num_threads)
    method = METHODS[method_key]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    data, tasks = load_data(args)
    num_labels = len(data.class_names)
    evaluator = make_evaluator(args, data, tasks, seed, classifier_state)
    config = protocol_args.unet_config_from_args(args, data.num_channels, data.resolution)
    learner = make_learner(method, args, config, tasks, seed, device, num_labels)
    sample_fn = sample_fn_of(learner, data)

    def evaluate(upto: int):
        return evaluator.evaluate(sample_fn, upto)[0]

    stages, train_seconds, generation_seconds, first_task = [], [], 0.0, 0
    settings = job_settings(args)
    partial = partial_folder(Path(args.output_dir), method_key, seed, settings)
    saved = read_partial(partial, settings) if method.kind != "joint" else None
    if saved is not None:
        # A job stopped part way: it continues at the task after the last one it finished, as if it had not stopped
        # (every step's randomness comes from (seed, task, step); the evaluator keeps nothing between tasks).
        record, tensors = saved
        learner.restore(record["task"], record["learner"])
        learner.model.load_state_dict(tensors, strict=True)
        stages = [TaskMetrics.from_dict(row) for row in record["stages"]]
        train_seconds, generation_seconds = record["train_seconds"], record["generation_seconds"]
        first_task = record["task"] + 1
        print(f"{method_key} seed {seed}: resumed after task {record['task']} from {partial}", flush=True)
    if method.kind == "joint":
        images, labels = data.train_images, data.train_labels
        keep = torch.isin(labels, torch.tensor([c for task in tasks for c in task]))
        groups = learner.begin_task(0)
        # The continual runs' steps, each with its batch size: as many images seen in all.
        batch_sizes = [b for task in range(len(tasks)) for b in task_batch_sizes(args, task)]
        train_seconds.append(train_steps(learner, groups, images[keep], labels[keep], batch_sizes, seed, 0, args))
        stages.append(evaluate(len(tasks) - 1))
    else:
        for task in range(first_task, len(tasks)):
            images, labels = task_dataset(data, tasks[task], split="train").tensors
            seconds = 0.0
            if method.kind == "replay" and task > 0:
                # The previous model generates the old classes once, before the task; this counts as training time.
                started = time.perf_counter()
                old = [c for done in tasks[:task] for c in done]
                per_class = args.replay_samples_per_class or round(images.shape[0] / len(tasks[task]))
                replay_x, replay_y = generate_per_class(
                    sample_fn, old, per_class, seed=1_000_000 + seed * 1000 + task, batch_size=256
                )
                images = torch.cat([to_model_range(images), replay_x.to(torch.float32)])
                labels = torch.cat([labels, replay_y.long()])
                seconds = time.perf_counter() - started
                generation_seconds += seconds
            groups = learner.begin_task(task)
            seconds += train_steps(learner, groups, images, labels, task_batch_sizes(args, task), seed, task, args)
            learner.end_task(task)
            train_seconds.append(seconds)
            stages.append(evaluate(task))
            if task + 1 < len(tasks):
                save_partial(partial, settings, task, learner, stages, train_seconds, generation_seconds)

    all_classes = [c for task in tasks for c in task]
    sampling_seconds = time_sampling(learner, data, all_classes, seed)
    result = {
        "method": method_key,
        "name": row_name(method, args),
        "seed": seed,
        "stages": [asdict(stage) for stage in stages],
        "final_cas": stages[-1].cas,
        "average_incremental_cas": None,
        "forgetting": None,
        "old_samples_identical": None,
        "fd": stages[-1].fd,
        "extra_parameters_per_class": learner.extra_parameters_per_class(),
        "train_seconds": sum(train_seconds),
        "train_seconds_per_task": train_seconds,
        "generation_seconds": generation_seconds,
        "train_steps": args.first_task_steps + (len(tasks) - 1) * args.task_steps,
        "sampling_seconds": sampling_seconds,
        "sampling_images": SAMPLING_IMAGES,
        "nfe": num_function_evaluations(args.num_inference_steps, "euler"),
        "peak_memory_mb": peak_memory_mb(device),
        "device": str(device),
    }
    if method.kind != "joint":
        metrics = ContinualMetrics(task_layout=tasks)
        for stage in stages:
            metrics.add(stage)
        result.update(
            average_incremental_cas=metrics.average_cas,
            forgetting=metrics.forgetting,
            accuracy_matrix=metrics.accuracy_matrix.rows,
            old_samples_identical=metrics.old_samples_identical,
        )
    if first_task:
        result["resumed_after_task"] = first_task - 1  # its peak memory is then that of the resumed process
    if method.kind == "funlora":
        result["rank_per_task"] = learner.rank_per_task
    if method.top_k:
        result["target_modules_after_task_0"] = learner.target_modules
        result["layer_importance"] = {k: float(v) for k, v in learner.importance.items()}
    return result


def partial_folder(output_dir: Path, method_key: str, seed: int, settings: dict) -> Path:
    """Where a running job keeps its state after its last finished task."""
    return output_dir / JOBS_SUBFOLDER / PARTIAL_SUBFOLDER / f"{method_key}-seed{seed}-{settings_digest(settings)}"


def save_partial(folder: Path, settings: dict, task: int, learner: Learner, stages, train_seconds, generation_seconds):
    """Keep the job's state after `task` in `folder` (replaced atomically): the model's tensors and, as JSON, the
    rows evaluated so far, the times and what the learner knows besides its tensors."""
    tensors = {name: value.detach().cpu().contiguous() for name, value in learner.model.state_dict().items()}
    record = {
        "settings": settings,
        "task": task,
        "stages": [asdict(stage) for stage in stages],
        "train_seconds": train_seconds,
        "generation_seconds": generation_seconds,
        "learner": learner.progress(),
    }

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / PARTIAL_TENSORS)
        write_json_atomic(tmp / PARTIAL_RECORD, {**record, "sha256": sha256_of(tmp / PARTIAL_TENSORS)})

    write_folder_atomic(folder, write)


def read_partial(folder: Path, settings: dict) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The record and tensors `save_partial` kept in `folder` with `settings`; None when there are none, or when
    they are incomplete, corrupted or made with other settings (the job then starts from its first task)."""
    record_path, tensors_path = folder / PARTIAL_RECORD, folder / PARTIAL_TENSORS
    if not record_path.is_file():
        return None
    try:
        record = read_json(record_path)
    except ValueError:
        record = None
    usable = (
        isinstance(record, dict)
        and isinstance(record.get("settings"), dict)
        and same_settings(record["settings"], settings)
        and tensors_path.is_file()
        and sha256_of(tensors_path) == record.get("sha256")
    )
    if not usable:
        print(f"{folder} cannot be resumed (incomplete, corrupted or other settings): the job starts over", flush=True)
        return None
    return record, load_file(tensors_path)


# --------------------------------------------------------------------------------------------------------------------
# Finished jobs, kept so that a stopped benchmark continues where it stopped
# --------------------------------------------------------------------------------------------------------------------


def job_settings(args: argparse.Namespace) -> dict:
    """The flags a job's result depends on; a kept job is reused only when they are the same."""
    return json.loads(json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in NOT_JOB_SETTINGS}))


# The flags a seed's real-data classifier and its accuracy depend on: the data and the classes the layout covers (every
# data flag but the cache folder) and the classifier's own training. A sweep of the generators' settings reuses the
# seed's classifier, so that every point is evaluated by the same one (and none waits for a new one).
CLASSIFIER_SETTINGS = (
    *(flag for flag in protocol_args.data_flags() if flag != "cache_dir"),
    *protocol_args.CLASSIFIER_FLAGS,
)


def classifier_settings(args: argparse.Namespace) -> dict:
    """The flags of CLASSIFIER_SETTINGS: a kept classifier is reused only when they are the same."""
    return json.loads(json.dumps({k: getattr(args, k) for k in sorted(CLASSIFIER_SETTINGS)}))


# A kept file's name: `{name}-{digest of its settings}.json`, so that runs with other settings (a sweep) sharing one
# output folder keep their jobs side by side; `{name}.json` is the name jobs were kept under before.
_KEPT_NAME = re.compile(r"(?P<name>.+?)(-[0-9a-f]{12})?")


def settings_digest(settings: dict) -> str:
    named = {k: v for k, v in settings.items() if not (k in UNDIGESTED_FLAGS and v == LATER_FLAGS[k])}
    return hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:12]


def same_settings(kept: dict, settings: dict) -> bool:
    """Whether settings kept with a job are `settings`, a flag added since (LATER_FLAGS) at the value it ran with."""
    later = {k: v for k, v in LATER_FLAGS.items() if k in settings}  # flags of a job's settings only
    return {**later, **kept} == settings


def _kept_file(output_dir: Path, name: str, settings: dict, suffix: str = ".json") -> Path:
    return output_dir / JOBS_SUBFOLDER / f"{name}-{settings_digest(settings)}{suffix}"


def find_kept(output_dir: Path, name: str, settings: dict) -> tuple[Path, dict] | None:
    """The kept record `name` of jobs/ made with `settings` and its path, else None (the job is then made again)."""
    for path in (_kept_file(output_dir, name, settings), output_dir / JOBS_SUBFOLDER / f"{name}.json"):
        if not path.is_file():
            continue
        kept = read_json(path)
        if isinstance(kept, dict) and isinstance(kept.get("settings"), dict):
            if same_settings(kept["settings"], settings):
                return path, kept["result"]
    return None


def read_kept(output_dir: Path, name: str, settings: dict) -> dict | None:
    found = find_kept(output_dir, name, settings)
    return None if found is None else found[1]


def keep(output_dir: Path, name: str, settings: dict, result: dict) -> None:
    write_json_atomic(_kept_file(output_dir, name, settings), {"settings": settings, "result": result})


def kept_jobs(output_dir: Path, settings: dict, exclude: set[tuple[str, int]]) -> dict[tuple[str, int], dict]:
    """Every (method, seed) job of jobs/ made with `settings`, but those in `exclude`."""
    jobs = set()  # a job may be kept under several settings (a sweep): each (method, seed) is looked up once
    for path in (output_dir / JOBS_SUBFOLDER).glob("*-seed*.json"):
        key, _, seed = _KEPT_NAME.fullmatch(path.stem)["name"].rpartition("-seed")
        if key in METHODS and seed.isdigit():
            jobs.add((key, int(seed)))
    found = {}
    for key, seed in sorted(jobs - exclude):
        result = read_kept(output_dir, f"{key}-seed{seed}", settings)
        if result is not None:
            found[key, seed] = result
    return found


def kept_classifier(output_dir: Path, name: str, settings: dict) -> tuple[Path, dict] | None:
    """The weights file and record of the classifier `name` kept in `output_dir` with `settings` (checked by its
    sha256), else None."""
    found = find_kept(output_dir, name, settings)
    if found is not None:
        weights, kept = found[0].with_suffix(".safetensors"), found[1]
        if weights.is_file() and sha256_of(weights) == kept["sha256"]:
            return weights, kept
    return None


def seed_classifier(args: argparse.Namespace, data, tasks, seed: int, output_dir: Path) -> tuple[dict, float]:
    """The fixed real-data classifier of `seed` (its state and test accuracy), trained once and kept in jobs/.

    Without one here, the one kept in `--classifier_dir` is copied into this folder's jobs/ (so that the folder keeps
    the classifier its table was evaluated with); without either, it is trained.
    """
    settings, name = classifier_settings(args), f"classifier-seed{seed}"
    found = kept_classifier(output_dir, name, settings)
    if found is None and args.classifier_dir is not None:
        source = kept_classifier(Path(args.classifier_dir), name, settings)
        if source is not None:
            weights = _kept_file(output_dir, name, settings, ".safetensors")
            write_file_atomic(weights, lambda path: shutil.copyfile(source[0], path))
            keep(output_dir, name, settings, source[1])
            found = weights, source[1]
    if found is not None:
        return load_file(found[0]), found[1]["real_data_accuracy"]
    evaluator = make_evaluator(args, data, tasks, seed)
    state = {k: v.detach().cpu().contiguous() for k, v in evaluator.classifier.state_dict().items()}
    weights = _kept_file(output_dir, name, settings, ".safetensors")
    write_file_atomic(weights, lambda path: save_file(state, path))
    kept = {"sha256": sha256_of(weights), "real_data_accuracy": evaluator.real_data_accuracy}
    keep(output_dir, name, settings, kept)
    return state, evaluator.real_data_accuracy


# --------------------------------------------------------------------------------------------------------------------
# Summary, table and plot
# --------------------------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict]) -> dict:
    summary = {"seeds": [run["seed"] for run in runs]}
    for key in (
        "final_cas",
        "average_incremental_cas",
        "forgetting",
        "fd",
        "extra_parameters_per_class",
        "train_seconds",
        "sampling_seconds",
        "peak_memory_mb",
    ):
        values = [run[key] for run in runs]
        summary[key] = None if None in values else dict(zip(("mean", "std"), _mean_std(values)))
    summary["nfe"] = runs[0]["nfe"]
    identical = [run["old_samples_identical"] for run in runs]
    summary["old_samples_identical"] = None if None in identical else all(identical)
    num_stages = len(runs[0]["stages"])
    summary["cas_after_task"] = [
        dict(zip(("mean", "std"), _mean_std([run["stages"][k]["cas"] for run in runs]))) for k in range(num_stages)
    ]
    summary["task_of_stage"] = [stage["task"] for stage in runs[0]["stages"]]
    ranked = [run for run in runs if "rank_per_task" in run]  # jobs kept from before the rank was recorded lack it
    if ranked:
        summary["rank_seeds"] = [run["seed"] for run in ranked]
        # Tasks >= 1 (the continual adapters; task 0's is trained with the backbone), the mean over tasks per seed.
        later = [[task for task in run["rank_per_task"] if task["task"] > 0] for run in ranked]
        for when in ("initial", "trained"):
            per_seed = [statistics.fmean(task[when]["mean"] for task in tasks) for tasks in later]
            summary[f"rank_{when}"] = dict(zip(("mean", "std"), _mean_std(per_seed)))
        summary["rank_trained_max"] = max(task["trained"]["max"] for tasks in later for task in tasks)
    return summary


def _pm(entry: dict | None, digits: int = 3) -> str:
    if entry is None:
        return "n/a"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def batch_sizes_text(args: argparse.Namespace) -> str:
    later = protocol_args.task_setting(args, "train_batch_size", 1)
    if later == args.train_batch_size:
        return f"{args.train_batch_size} images per step"
    return f"{args.train_batch_size} images per step in task 0's steps, {later} in the later tasks' (joint: in order)"


def results_table(args, methods: list[Method], summaries: dict, info: dict, notes: list[str]) -> str:
    lines = [
        f"Class-incremental {info['dataset']} at {args.resolution}x{args.resolution}: {info['num_tasks']} tasks "
        f"({info['task_layout']}); UNet2DModel block_out_channels ({args.block_out_channels}), layers_per_block "
        f"{args.layers_per_block}; mean ± std over the seeds of each row.",
        f"Equal budget: every continual method takes {args.first_task_steps} steps on task 0 and {args.task_steps} "
        f"steps on each later task ({info['total_steps']} steps), joint training takes {info['total_steps']} steps "
        f"on all classes; batch {batch_sizes_text(args)} for all, with the same per-step batch indices, noise "
        "and flow times.",
        f"CAS: a classifier trained on {args.eval_samples_per_class} generated samples per seen class "
        f"({args.classifier_epochs} epochs), tested on the real test images; a classifier trained on real data "
        f"reaches {info['real_data_accuracy']:.3f}. Forgetting: of the fixed real-data classifier's per-task "
        "recognition accuracy. FD: Frechet distance in that classifier's feature space after the last task.",
        "Extra parameters per class: adapter scalars of a class of tasks >= 1 (FunLoRA, LoRA); the class's "
        "embedding row (time_embed_dim) for the class-embedding UNets. Training time: all tasks, generation of the "
        f"replay pools included. Sampling: {SAMPLING_IMAGES} images of mixed classes in one batch, Euler. Peak "
        f"memory: {info['memory_method']}. Machine: {info['machine']}.",
        "",
        "| method | seeds | final CAS | average incremental CAS | forgetting | FD | extra parameters per class | "
        f"training time (s) | sampling {SAMPLING_IMAGES} images (s, NFE) | peak memory (MB) |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for method in methods:
        s = summaries[row_name(method, args)]
        seeds = ",".join(map(str, s["seeds"]))
        lines.append(
            f"| {row_name(method, args)} | {seeds} | {_pm(s['final_cas'])} | {_pm(s['average_incremental_cas'])} | "
            f"{_pm(s['forgetting'])} | {_pm(s['fd'], 2)} | {s['extra_parameters_per_class']['mean']:,.0f} | "
            f"{s['train_seconds']['mean']:.1f} | {s['sampling_seconds']['mean']:.2f} ({s['nfe']}) | "
            f"{s['peak_memory_mb']['mean']:.0f} |"
        )
    ranked = [m for m in methods if summaries[row_name(m, args)].get("rank_initial")]
    if ranked:
        lines += [
            "",
            "Rank of F_y, over the adapted convs and the classes of tasks >= 1: at initialisation with every "
            "alpha_i = 1 (the rank the p initial terms span; alpha starts at 0, so F_y itself starts at 0) and "
            "after training.",
            "",
            "| method | seeds | p | mean rank at initialisation (alpha = 1) | mean rank trained | highest rank "
            "trained |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for method in ranked:
            s = summaries[row_name(method, args)]
            lines.append(
                f"| {row_name(method, args)} | {','.join(map(str, s['rank_seeds']))} | "
                f"{num_functions_of(method, args)} | "
                f"{_pm(s['rank_initial'], 1)} | "
                f"{_pm(s['rank_trained'], 1)} | {s['rank_trained_max']} |"
            )
    for note in notes:
        lines.append(f"\n{note}")
    return "\n".join(lines) + "\n"


def plot_cas(path: Path, names: list[str], summaries: dict, num_tasks: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    for i, name in enumerate(names):
        s, color = summaries[name], colors[i % len(colors)]
        x = s["task_of_stage"]
        mean = [e["mean"] for e in s["cas_after_task"]]
        std = [e["std"] for e in s["cas_after_task"]]
        if len(x) == 1:  # joint training: one point, after all classes
            axes.axhline(mean[0], linestyle="--", linewidth=1, color=color, label=name)
            axes.errorbar(x, mean, yerr=std, fmt="o", color=color, capsize=3)
        else:
            axes.errorbar(x, mean, yerr=std, marker="o", markersize=3, capsize=2, color=color, label=name)
    axes.set_xticks(range(num_tasks))
    axes.set_xlabel("after task")
    axes.set_ylabel("CAS (all classes seen so far)")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def exit_with_parent(parent: int, interval: float = 2.0) -> None:
    """Worker initializer: end the worker once the benchmark process `parent` that started it is gone (killed), instead
    of training on for nobody; what the job finished is kept in jobs/partial/ and resumed by the next run."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def machine_description(args: argparse.Namespace) -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {max(args.num_workers, 1)} worker process(es)"
    return (
        f"{os.cpu_count()} CPU cores, {max(args.num_workers, 1)} worker process(es) of {args.num_threads} torch "
        "thread(s), no GPU"
    )


# --------------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    try:
        check_args(args)
        methods, notes = selected_methods(args)
        data, tasks = load_data(args)
    except (ValueError, TypeError) as error:
        raise protocol_args.script_error("benchmark.py", error) from None
    torch.set_num_threads(args.num_threads)
    seeds = protocol_args.int_list("--seeds", args.seeds, "0,1,2")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # One fixed real-data classifier per seed, shared by every method (recognition accuracy, forgetting, FD).
    classifiers, real_accuracy = {}, {}
    for seed in seeds:
        classifiers[seed], real_accuracy[seed] = seed_classifier(args, data, tasks, seed, output_dir)
    print(f"real-data classifier accuracy: {real_accuracy}", flush=True)
    settings = job_settings(args)

    # Longest jobs first, so that the two workers finish together.
    cost = {"lora": 0, "replay": 1, "funlora": 2, "finetune": 3, "joint": 3}
    jobs = sorted(((m.key, seed) for m in methods for seed in seeds), key=lambda job: cost[METHODS[job[0]].kind])
    runs: dict[str, list[dict]] = {row_name(m, args): [] for m in methods}

    def record(result: dict, kept: bool = False) -> None:
        runs[result["name"]].append(result)
        if not kept:
            keep(output_dir, f"{result['method']}-seed{result['seed']}", settings, result)
            shutil.rmtree(partial_folder(output_dir, result["method"], result["seed"], settings), ignore_errors=True)
        print(
            f"{result['name']} seed {result['seed']}: final CAS {result['final_cas']:.3f}, forgetting "
            f"{result['forgetting']}, train {result['train_seconds']:.1f}s "
            f"({'kept from an earlier run' if kept else f'{time.perf_counter() - started:.0f}s elapsed'})",
            flush=True,
        )

    diverged: list[dict] = []

    def record_diverged(key: str, seed: int, error: training.TrainingDiverged) -> None:
        # The other jobs go on. The job keeps no result (its state after its last finished task stays in
        # jobs/partial/, so the same command reaches the divergence again at once) and the table names it.
        method = METHODS[key]
        message = protocol_args.diverged_message(error, args, learning_rate_flags(method, error.task))
        diverged.append({"method": key, "name": row_name(method, args), "seed": seed, "message": message})
        print(f"{row_name(method, args)} seed {seed}: {message}", flush=True)

    pending = []
    for key, seed in jobs:
        result = read_kept(output_dir, f"{key}-seed{seed}", settings)
        if result is None:
            pending.append((key, seed))
        else:
            record(result, kept=True)
    jobs = pending
    if args.num_workers == 0:
        for key, seed in jobs:
            try:
                record(run_job(args, key, seed, classifiers[seed]))
            except training.TrainingDiverged as error:
                record_diverged(key, seed, error)
    else:
        import multiprocessing

        os.environ.setdefault("OMP_NUM_THREADS", str(args.num_threads))
        context = multiprocessing.get_context("spawn")
        # One fresh process per job: its peak resident set size is that job's alone.
        with ProcessPoolExecutor(
            args.num_workers,
            mp_context=context,
            max_tasks_per_child=1,
            initializer=exit_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            futures = {pool.submit(run_job, args, key, seed, classifiers[seed]): (key, seed) for key, seed in jobs}
            for future in as_completed(futures):
                try:
                    record(future.result())
                except training.TrainingDiverged as error:
                    record_diverged(*futures[future], error)

    # Jobs kept with the same settings by other runs join the table: a benchmark run in pieces (one command per
    # method, one after another or side by side in one folder) reports in one table. Read once this run's jobs are
    # done, so that a job another command finished meanwhile is in it.
    others = kept_jobs(output_dir, settings, exclude={(m.key, seed) for m in methods for seed in seeds})
    for method in [m for m in METHODS.values() if m.key in {key for key, _ in others}]:
        if method not in methods:
            methods.append(method)
            runs[row_name(method, args)] = []
    for result in others.values():
        runs[result["name"]].append(result)
    methods = [method for method in methods if runs[row_name(method, args)]]  # every seed diverged: no row
    notes += [f"Diverged, not in the table: {job['name']} seed {job['seed']}: {job['message']}" for job in diverged]
    methods.sort(key=lambda method: list(METHODS).index(method.key))
    runs = {row_name(method, args): runs[row_name(method, args)] for method in methods}  # in the table's order
    summaries = {}
    for name, method_runs in runs.items():
        runs[name] = sorted(method_runs, key=lambda run: run["seed"])
        summaries[name] = summarize(runs[name])
    wall_seconds = time.perf_counter() - started
    device_is_cuda = torch.cuda.is_available()
    info = {
        "dataset": data.name,
        "num_tasks": len(tasks),
        "task_layout": ", ".join("{" + ", ".join(map(str, task)) + "}" for task in tasks),
        "total_steps": args.first_task_steps + (len(tasks) - 1) * args.task_steps,
        "real_data_accuracy": statistics.fmean(real_accuracy.values()),
        "memory_method": "torch.cuda.max_memory_allocated"
        if device_is_cuda
        else "peak resident set size (ru_maxrss) of the job's process, libraries included",
        "machine": machine_description(args),
    }
    table = results_table(args, methods, summaries, info, notes)
    (output_dir / RESULTS_MD).write_text(table)
    plot_cas(output_dir / PLOT_FILE, list(runs), summaries, len(tasks))
    results = {
        "command": "python examples/benchmark.py " + " ".join(sys.argv[1:]) if sys.argv else None,
        "settings": {k: v for k, v in vars(args).items()},
        "task_layout": tasks,
        "real_data_accuracy": {str(k): v for k, v in real_accuracy.items()},
        "wall_seconds": wall_seconds,
        "info": info,
        "notes": notes,
        "diverged": diverged,
        "summaries": summaries,
        "runs": runs,
    }
    (output_dir / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    written = ", ".join(str(output_dir / name) for name in (RESULTS_MD, RESULTS_JSON, PLOT_FILE))
    print(f"wrote {written} in {wall_seconds:.0f}s")
    if diverged:
        names = ", ".join(f"{job['name']} seed {job['seed']}" for job in diverged)
        raise protocol_args.script_error("benchmark.py", f"{len(diverged)} job(s) diverged ({names}): see above.")
    return results


if __name__ == "__main__":
    main(parse_args())
