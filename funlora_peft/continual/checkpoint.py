"""Resumable training states: `checkpoint-N` folders in a run folder, written atomically, nothing pickled.

`Checkpointer.save_state` writes the training state into a hidden temporary folder (the model, EMA and optimizer
tensors as safetensors, the optimizer's settings and the scheduler's state as JSON), `save_checkpoint` adds a
`training_state.json` listing the sha256 of every file and the run's key settings, then renames the folder to
`checkpoint-{global_step}`; `read_checkpoint` refuses a missing, incomplete, corrupted or foreign checkpoint before
anything is loaded. No random-number state is stored: every step draws its randomness from
`funlora_peft.continual.training.step_generator(seed, task, step)`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..run_folder import CHECKPOINT_PREFIX, read_json, sha256_of, write_folder_atomic
from ..tuner.model import FunLoRAModel, check_adapter_state_dict

__all__ = [
    "CHECKPOINT_FILES",
    "CheckpointError",
    "Checkpointer",
    "TrainingState",
    "check_checkpoint_tensors",
    "list_checkpoints",
    "prune_checkpoints",
    "read_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "thread_count_note",
]

STATE_FILE = "training_state.json"
STATE_FORMAT_VERSION = 1
CKPT_ADAPTER_FILE = "adapter_model.safetensors"
CKPT_BACKBONE_FILE = "backbone.safetensors"
CKPT_EMA_FILE = "ema.safetensors"
CKPT_OPTIMIZER_TENSORS = "optimizer.safetensors"
CKPT_OPTIMIZER_JSON = "optimizer.json"
CKPT_SCHEDULER_JSON = "scheduler.json"
CKPT_SCALER_JSON = "grad_scaler.json"
# What every checkpoint holds; a task-0 checkpoint also holds CKPT_BACKBONE_FILE, one with an EMA CKPT_EMA_FILE.
CHECKPOINT_FILES = (CKPT_ADAPTER_FILE, CKPT_OPTIMIZER_TENSORS, CKPT_OPTIMIZER_JSON, CKPT_SCHEDULER_JSON)
_ADAPTER_PREFIX = FunLoRAModel.prefix


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: missing, incomplete, corrupted, or written by another run."""


@dataclass
class TrainingState:
    """Where a checkpoint stands, stored as `training_state.json` in it.

    Attributes:
        task: index of the task being trained.
        task_step: optimisation steps of that task already done (equal to the task's step count once it is trained).
        global_step: optimisation steps over all tasks.
        train_seconds: training time of the current task so far.
        run_key: the settings that determine the training trajectory; a checkpoint resumes only a run with equal ones.
        ema_optimization_step: the EMA's step counter (None without EMA).
        cpu_threads: torch's CPU thread count when the run trained on the CPU (None on an accelerator, and in
            checkpoints written before it was recorded); see `thread_count_note`.
        files: sha256 of every other file of the checkpoint.
    """

    task: int
    task_step: int
    global_step: int
    train_seconds: float = 0.0
    run_key: dict = field(default_factory=dict)
    ema_optimization_step: int | None = None
    cpu_threads: int | None = None
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = STATE_FORMAT_VERSION


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """`(global_step, path)` of the finished `checkpoint-N` folders of `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(output_dir: str | os.PathLike, value: str) -> Path | None:
    """The checkpoint folder `value` names: "latest" (None when there is none), a path, or a name.

    A name without a path (e.g. `checkpoint-500`) is looked up in `output_dir`.
    """
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(value)
    if not path.exists() and not path.is_absolute() and len(path.parts) == 1:
        path = Path(output_dir) / value
    if not path.is_dir():
        raise CheckpointError(
            f"{value!r} is no checkpoint folder ({path} does not exist). Pass 'latest' or a {CHECKPOINT_PREFIX}N "
            f"folder of the run; available in {output_dir}: {[p.name for _, p in list_checkpoints(output_dir)]}."
        )
    return path


def save_checkpoint(
    checkpointer,
    output_dir: str | os.PathLike,
    state: TrainingState,
    total_limit: int | None = None,
) -> Path:
    """Write `checkpoint-{global_step}` atomically (main process only) and prune old ones to `total_limit`.

    `checkpointer.save_state` (a `Checkpointer`) writes into a hidden temporary folder; `training_state.json` (with the
    sha256 of every file) is written last and the folder renamed into place, so a kill at any moment leaves either the
    previous set of checkpoints or a complete new one, never a half-written `checkpoint-N`.
    """
    output_dir = Path(output_dir)
    for stale in output_dir.glob(f".{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)

    def write(tmp: Path) -> None:
        checkpointer.save_state(tmp)
        state.files = {
            path.relative_to(tmp).as_posix(): sha256_of(path) for path in sorted(tmp.rglob("*")) if path.is_file()
        }
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")

    target = write_folder_atomic(output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}", write)
    prune_checkpoints(output_dir, total_limit)
    return target


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints beyond `total_limit`; returns the deleted folders."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = [path for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]]
    for path in removed:
        shutil.rmtree(path)
    return removed


def read_checkpoint(path: str | os.PathLike, run_key: dict, required_files: Sequence[str] = ()) -> TrainingState:
    """Read and check a checkpoint before anything is loaded from it.

    Refuses (with `CheckpointError`) a folder without `training_state.json`, an unknown format, a run key that differs
    from `run_key` (a checkpoint of another run), a missing required file and any file whose sha256 differs from the
    one recorded at save time (a corrupted or edited checkpoint).
    """
    path = Path(path)
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(
            f"{path} is not a training checkpoint: it has no {STATE_FILE}. Resume only from the {CHECKPOINT_PREFIX}N "
            "folders a training run wrote."
        )
    try:
        state = TrainingState(**read_json(state_path))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{state_path} is corrupted ({err}); resume from another checkpoint.") from None
    if state.format_version != STATE_FORMAT_VERSION:
        raise CheckpointError(
            f"{state_path}: unknown format_version {state.format_version!r} (this version of funlora-peft "
            f"writes {STATE_FORMAT_VERSION})."
        )
    differences = {
        key: (state.run_key.get(key, "<missing>"), run_key.get(key, "<missing>"))
        for key in sorted(set(state.run_key) | set(run_key))
        if state.run_key.get(key, "<missing>") != run_key.get(key, "<missing>")
    }
    if differences:
        shown = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in differences.items())
        raise CheckpointError(
            f"{path} belongs to a different run ({shown}). Resume with the settings of the run that wrote it, or "
            "start a new run in another folder."
        )
    for name in required_files:
        if name not in state.files:
            raise CheckpointError(f"{path} is incomplete: it lacks {name}.")
    for name, expected in state.files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path} is incomplete: {name} is missing.")
        if sha256_of(file) != expected:
            raise CheckpointError(
                f"{path}: {name} does not match the sha256 recorded when the checkpoint was written (corrupted or "
                "modified); resume from another checkpoint."
            )
    return state


def thread_count_note(state: TrainingState, device_type: str, cpu_threads: int) -> str | None:
    """Why a resumed run will not be bit-identical to an uninterrupted one, if it trains with another CPU thread count.

    On the CPU, torch splits its float sums over its threads, so a different count rounds them differently: the run
    goes on from the checkpoint exactly, but its later steps differ in the last bits from the steps the interrupted
    run would have taken. Returns None when the counts agree, on an accelerator, or when the checkpoint recorded none.
    """
    if device_type != "cpu" or state.cpu_threads is None or state.cpu_threads == cpu_threads:
        return None
    return (
        f"the checkpoint's run trained with {state.cpu_threads} CPU thread(s) and this one has {cpu_threads}: it "
        "continues from the checkpoint, but float sums round differently with another count, so its weights will "
        f"not be bit-identical to an uninterrupted run's. Pass --num_threads {state.cpu_threads} for that."
    )


def check_checkpoint_tensors(
    path: str | os.PathLike, peft_model: nn.Module, adapter_name: str, with_backbone: bool, ema_names: Sequence[str]
) -> None:
    """Check that the checkpoint's tensors fit `peft_model` (names, shapes, finite values) before loading any."""
    path = Path(path)
    adapter = load_file(path / CKPT_ADAPTER_FILE)
    problem = check_adapter_state_dict(peft_model, adapter_name, adapter)
    if problem is not None:
        raise CheckpointError(f"{path / CKPT_ADAPTER_FILE}: {problem}")
    if with_backbone:
        expected = {k: v for k, v in peft_model.state_dict().items() if _ADAPTER_PREFIX not in k}
        _check_tensor_file(path / CKPT_BACKBONE_FILE, expected)
    if ema_names:
        params = dict(peft_model.named_parameters())
        _check_tensor_file(path / CKPT_EMA_FILE, {name: params[name] for name in ema_names})


def _check_tensor_file(file: Path, expected: dict[str, torch.Tensor]) -> None:
    with safe_open(file, framework="pt") as handle:
        keys = set(handle.keys())
        if keys != set(expected):
            missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
            raise CheckpointError(f"{file} does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}.")
        for key in keys:
            shape = tuple(handle.get_slice(key).get_shape())
            if shape != tuple(expected[key].shape):
                raise CheckpointError(f"{file}: {key} has shape {shape}, the model {tuple(expected[key].shape)}.")


def optimizer_state_to_files(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer `state_dict()` into its tensors (for safetensors) and the rest (for JSON).

    Tensors are keyed `state.<param index>.<name>` (e.g. `state.3.exp_avg`); `param_groups` and non-tensor state
    entries go to the JSON part. `optimizer_state_from_files` is the inverse.
    """
    tensors, state = {}, {}
    for index, entries in state_dict["state"].items():
        kept = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                kept[name] = value
        state[str(index)] = kept
    meta = {"state": state, "param_groups": state_dict["param_groups"]}
    json.dumps(meta)  # a value JSON cannot hold fails here, at save time, not at resume
    return tensors, meta


def optimizer_state_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The optimizer `state_dict()` that `optimizer_state_to_files` split."""
    state = {int(index): dict(kept) for index, kept in meta["state"].items()}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


class Checkpointer:
    """Writes and reads the training state of a checkpoint as safetensors and JSON: nothing is pickled.

    A checkpoint holds the trained adapter (`adapter_model.safetensors`, PEFT's key format), the backbone while it
    trains (`backbone.safetensors`, during task 0 only: later the frozen backbone lives in the run's `backbone/`
    folder), the EMA's shadow tensors (`ema.safetensors`) when an EMA is set, the optimizer state
    (`optimizer.safetensors` + `optimizer.json`), the learning-rate scheduler state (`scheduler.json`) and, with
    fp16 mixed precision, the gradient scaler's (`grad_scaler.json`). No random-number state is needed: every step
    draws its randomness from `step_generator(seed, task, step)`.

    Example:
        >>> checkpointer = Checkpointer(accelerator)
        >>> checkpointer.configure("task_0", train_backbone=True, model=model, optimizer=optimizer, lr_scheduler=sched)
        >>> save_checkpoint(checkpointer, output_dir, state)      # calls checkpointer.save_state(folder)
        >>> checkpointer.load_state(folder)
    """

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.adapter_name: str | None = None
        self.train_backbone = False
        self.ema = None
        self.ema_names: list[str] = []
        self.model = self.optimizer = self.lr_scheduler = None

    def configure(
        self,
        adapter_name: str,
        train_backbone: bool,
        ema=None,
        ema_names: Sequence[str] = (),
        *,
        model: nn.Module,
        optimizer,
        lr_scheduler,
    ) -> None:
        """Set what the next checkpoints hold: the adapter being trained, the backbone or not, the EMA, and the
        (prepared) model, optimizer and scheduler of the task."""
        self.adapter_name = adapter_name
        self.train_backbone = train_backbone
        self.ema = ema
        self.ema_names = list(ema_names)
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler

    def _scaler(self):
        return getattr(self.accelerator, "scaler", None)

    def save_state(self, folder: str | os.PathLike) -> None:
        """Write the training state into `folder` (an existing, empty folder)."""
        folder = Path(folder)
        peft_model = self.accelerator.unwrap_model(self.model)
        adapter = get_peft_model_state_dict(peft_model, adapter_name=self.adapter_name, save_embedding_layers=False)
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, folder / CKPT_ADAPTER_FILE)
        if self.train_backbone:
            backbone = {k: v.detach().cpu().contiguous() for k, v in peft_model.state_dict().items()}
            save_file({k: v for k, v in backbone.items() if _ADAPTER_PREFIX not in k}, folder / CKPT_BACKBONE_FILE)
        if self.ema is not None:
            shadow = {n: s.detach().cpu().contiguous() for n, s in zip(self.ema_names, self.ema.shadow_params)}
            save_file(shadow, folder / CKPT_EMA_FILE)
        tensors, meta = optimizer_state_to_files(self.optimizer.state_dict())
        save_file(tensors, folder / CKPT_OPTIMIZER_TENSORS)
        _write_json(folder / CKPT_OPTIMIZER_JSON, meta)
        _write_json(folder / CKPT_SCHEDULER_JSON, self.lr_scheduler.state_dict())
        if self._scaler() is not None:
            _write_json(folder / CKPT_SCALER_JSON, self._scaler().state_dict())

    def load_state(self, folder: str | os.PathLike) -> None:
        """Load what `save_state` wrote (after `read_checkpoint` and `check_checkpoint_tensors` checked it)."""
        folder = Path(folder)
        peft_model = self.accelerator.unwrap_model(self.model)
        device = next(peft_model.parameters()).device
        adapter = load_file(folder / CKPT_ADAPTER_FILE, device=str(device))
        result = set_peft_model_state_dict(peft_model, adapter, adapter_name=self.adapter_name)
        if result.unexpected_keys:
            raise CheckpointError(f"{folder}: unexpected adapter tensors {result.unexpected_keys[:3]}.")
        if self.train_backbone:
            backbone = load_file(folder / CKPT_BACKBONE_FILE, device=str(device))
            missing, unexpected = peft_model.load_state_dict(backbone, strict=False)
            missing = [k for k in missing if _ADAPTER_PREFIX not in k]
            if missing or unexpected:
                raise CheckpointError(f"{folder}: backbone tensors missing {missing[:3]}, extra {unexpected[:3]}.")
        if self.ema is not None:
            shadow = load_file(folder / CKPT_EMA_FILE)
            with torch.no_grad():
                for name, tensor in zip(self.ema_names, self.ema.shadow_params):
                    tensor.copy_(shadow[name])
        meta = json.loads((folder / CKPT_OPTIMIZER_JSON).read_text())
        self.optimizer.load_state_dict(optimizer_state_from_files(load_file(folder / CKPT_OPTIMIZER_TENSORS), meta))
        self.lr_scheduler.load_state_dict(json.loads((folder / CKPT_SCHEDULER_JSON).read_text()))
        if self._scaler() is not None and (folder / CKPT_SCALER_JSON).is_file():
            self._scaler().load_state_dict(json.loads((folder / CKPT_SCALER_JSON).read_text()))
