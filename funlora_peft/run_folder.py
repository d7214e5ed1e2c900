"""The run folder: THE on-disk format of a FunLoRA run, its file names, readers and writers.

A run folder (or a Hub model repo with the same files) holds a backbone and one adapter per task:

```
funlora.json         index: format version, tasks in order with their class ids, function, p, target layers,
                     backbone subfolder, class names, sha256 of every file of backbone/, task_k/ and scheduler/
backbone/            UNet2DModel config + diffusion_pytorch_model.safetensors
task_0/, task_1/...  adapter_config.json + adapter_model.safetensors, one folder per task (PEFT's adapter format)
scheduler/           the sampler's scheduler config, when a pipeline saved it (`FunLoRAPipeline.save_pretrained`)
metrics.json         the evaluation after each task (`funlora_peft.continual.evaluation.ContinualMetrics`)
importance.json      the layer scores and the convs later tasks adapt (`funlora_peft.continual.importance`)
importance.png       their bar plot
samples/             after_task_k.png sample grids, one row per class
README.md            the model card (`funlora_peft.model_card`)
checkpoint-N/        resumable training states (`funlora_peft.continual.checkpoint`)
```

`save_run` writes a run from a FunLoRA `PeftModel` and `FunLoRAPipeline.from_pretrained` (or `attach_tasks`) reads it
back; the Hub helpers upload it as is, so a run folder and a Hub repo are interchangeable. Every file is written to a
hidden temporary name beside its target and renamed into place (`write_file_atomic`, `write_folder_atomic`), so a
reader or a resumed run never sees half a file. Everything here reads safetensors and JSON only; nothing is unpickled.

Example:

    ```py
    >>> from funlora_peft.run_folder import save_run
    >>> save_run(peft_model, "runs/mine", class_names={0: "zero", 1: "one"})   # backbone, task folders, index
    >>> pipe = FunLoRAPipeline.from_pretrained("runs/mine")
    ```
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, UNet2DModel
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .continual.evaluation import ContinualMetrics
from .continual.importance import ImportanceRecord
from .tuner.config import FunLoRAConfig
from .tuner.layer import FunLoRALayer
from .tuner.model import (
    FunLoRAModel,
    _router_of,
    adapter_parameters,
    load_adapter_tensors,
    requires_grad_restored_on_failure,
)

FORMAT_VERSION = 2  # 2: every file of the backbone, the tasks and the scheduler is hashed (1: the weights only)
READABLE_FORMATS = (1, 2)
INDEX_FILE = "funlora.json"
BACKBONE_SUBFOLDER = "backbone"
BACKBONE_WEIGHTS = "diffusion_pytorch_model.safetensors"
BACKBONE_CONFIG = "config.json"
SCHEDULER_SUBFOLDER = "scheduler"
# The schedulers a run samples with (flow matching); `scheduler/` holds the config of one of them.
SCHEDULER_CLASSES = (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
METRICS_FILE = "metrics.json"
IMPORTANCE_FILE = "importance.json"
IMPORTANCE_PLOT = "importance.png"
SAMPLES_SUBFOLDER = "samples"
MODEL_CARD_FILE = "README.md"
CHECKPOINT_PREFIX = "checkpoint-"
TASK_PREFIX = "task_"


def task_name(task: int) -> str:
    """The adapter (and subfolder) name of task `task`: `task_0`, `task_1`, ..."""
    return f"{TASK_PREFIX}{task}"


def sample_grid_path(task: str | TaskEntry) -> str:
    """Path, relative to the run folder, of the sample grid drawn after `task` (a task name or index entry)."""
    name = task if isinstance(task, str) else task.name
    return f"{SAMPLES_SUBFOLDER}/after_{name}.png"


# --------------------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------------------


def write_file_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a hidden temporary path beside `path`, then rename it over `path`.

    A reader sees the old file or the complete new one, never a partial one; on an error the temporary file is removed
    and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write `data` as indented JSON to `path`, atomically (`write_file_atomic`)."""
    text = json.dumps(data, indent=2) + "\n"  # a value JSON cannot hold fails here, before anything is written
    return write_file_atomic(path, lambda tmp: tmp.write_text(text))


def write_folder_atomic(folder: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a new hidden folder beside `folder`, then swap it in for `folder`.

    An existing `folder` is renamed aside first and deleted once the new one is in place; on an error the temporary
    folder is removed and `folder` is left as it was.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.*"):  # left by a writer killed part way
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folders are private (0700); a plain mkdir's are not
    try:
        write(tmp)
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, remedy: str = "") -> object:
    """The JSON value stored in the file `path`; a ValueError naming the file (and `remedy`) when it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}){'; ' + remedy if remedy else ''}.") from None


def _read_record(path: Path, parse: Callable, remedy: str = ""):
    """`parse(JSON of path)`, None when the file does not exist; a ValueError naming the file when it is malformed."""
    if not path.is_file():
        return None
    data = read_json(path, remedy)
    try:
        return parse(data)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is malformed ({error}){'; ' + remedy if remedy else ''}.") from None


# --------------------------------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TaskEntry:
    """One task of a run: the adapter subfolder `name` and the global class ids it owns."""

    name: str
    class_ids: list[int]
    function: str
    num_functions: int
    target_modules: list[str] | str | None = None

    @classmethod
    def from_config(cls, name: str, config: FunLoRAConfig) -> TaskEntry:
        """The index entry of adapter `name` with config `config`."""
        targets = config.target_modules
        targets = sorted(targets) if isinstance(targets, (set, tuple)) else targets
        return cls(name, list(config.class_ids), config.function, config.num_functions, targets)


@dataclass
class RunIndex:
    """The contents of `funlora.json`."""

    format_version: int = FORMAT_VERSION
    backbone: str = BACKBONE_SUBFOLDER
    tasks: list[TaskEntry] = field(default_factory=list)
    class_names: dict[int, str] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def owner_of(self, class_id: int) -> str | None:
        """Name of the task owning `class_id`, or None."""
        for task in self.tasks:
            if class_id in task.class_ids:
                return task.name
        return None

    def to_json(self) -> str:
        data = asdict(self)
        data["class_names"] = {str(k): v for k, v in self.class_names.items()}
        return json.dumps(data, indent=2) + "\n"


def _check_class_names(class_names) -> None:
    """`class_names` is None or `{class id: name}` with non-negative int ids and str names (what the index holds)."""
    if class_names is None:
        return
    if not isinstance(class_names, dict):
        raise TypeError(f"`class_names` must be a dict {{class id: name}}, got {type(class_names).__name__}.")
    bad = [
        (k, v)
        for k, v in class_names.items()
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0 or not isinstance(v, str)
    ]
    if bad:
        raise TypeError(
            f"`class_names` maps non-negative integer class ids to str names, got {bad[:3]}; e.g. {{0: 'T-shirt'}}."
        )


def write_index(folder: str | os.PathLike, tasks: list[TaskEntry], class_names: dict[int, str] | None = None) -> Path:
    """Write `funlora.json` for `folder`, hashing the backbone's and every task's safetensors files, atomically."""
    _check_class_names(class_names)
    folder = Path(folder)
    index = RunIndex(tasks=list(tasks), class_names={int(k): v for k, v in (class_names or {}).items()})
    _check_unique_classes(index, source=str(folder / INDEX_FILE))
    subfolders = [BACKBONE_SUBFOLDER, SCHEDULER_SUBFOLDER] + [task.name for task in tasks]
    for sub in subfolders:
        for path in sorted((folder / sub).glob("*")):
            if path.is_file() and not path.name.startswith("."):
                index.sha256[path.relative_to(folder).as_posix()] = sha256_of(path)
    text = index.to_json()
    return write_file_atomic(folder / INDEX_FILE, lambda tmp: tmp.write_text(text))


def read_index(folder: str | os.PathLike) -> RunIndex:
    """Read and check `funlora.json`: known format version, well-formed tasks, class ids unique across tasks."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise ValueError(
            f"{path} not found: a FunLoRA run folder holds {INDEX_FILE}, {BACKBONE_SUBFOLDER}/ and one folder per "
            "task, as `funlora_peft.run_folder.save_run` writes it."
        )
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is malformed: it holds {type(data).__name__}, not a JSON object.")
    version = data.get("format_version")
    if isinstance(version, bool) or version not in READABLE_FORMATS:
        raise ValueError(
            f"{path}: unknown format_version {version!r}; this version of funlora-peft reads formats "
            f"{list(READABLE_FORMATS)}. Upgrade funlora-peft or re-export the run."
        )
    try:
        if not isinstance(data["tasks"], list) or not data["tasks"]:
            raise ValueError(f"tasks must be a non-empty list of tasks, got {data['tasks']!r}")
        tasks = [_task_entry(task) for task in data["tasks"]]
        backbone = data.get("backbone", BACKBONE_SUBFOLDER)
        if not isinstance(backbone, str) or not backbone:
            raise ValueError(f"backbone must name the backbone's folder, got {backbone!r}")
        class_names = data.get("class_names", {})
        if not isinstance(class_names, dict) or not all(isinstance(v, str) for v in class_names.values()):
            raise ValueError(f"class_names must map class ids to names, got {class_names!r}")
        sha256 = data.get("sha256", {})
        if not isinstance(sha256, dict):
            raise ValueError(f"sha256 must map file paths to digests, got {sha256!r}")
        index = RunIndex(
            format_version=version,
            backbone=backbone,
            tasks=tasks,
            class_names={int(k): v for k, v in class_names.items()},
            sha256=dict(sha256),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is malformed ({err!r}).") from None
    _check_unique_classes(index, source=str(path))
    return index


def _task_entry(data) -> TaskEntry:
    """A task of the index, its fields checked: a task named like a folder, distinct integer class ids, ..."""
    if not isinstance(data, dict):
        raise TypeError(f"a task must be a JSON object, got {data!r}")
    entry = TaskEntry(**data)
    if not isinstance(entry.name, str) or not entry.name or "/" in entry.name or entry.name.startswith("."):
        raise ValueError(f"task name {entry.name!r} is not a folder name")
    ids = entry.class_ids
    if (
        not isinstance(ids, list)
        or not ids
        or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in ids)
    ):
        raise ValueError(f"task {entry.name!r}: class_ids {ids!r} must be a list of non-negative integers")
    if (
        not isinstance(entry.function, str)
        or isinstance(entry.num_functions, bool)
        or not isinstance(entry.num_functions, int)
    ):
        raise ValueError(f"task {entry.name!r}: function {entry.function!r} / num_functions {entry.num_functions!r}")
    return entry


def _check_unique_classes(index: RunIndex, source: str) -> None:
    seen: dict[int, str] = {}
    for task in index.tasks:
        for class_id in task.class_ids:
            if class_id in seen:
                raise ValueError(
                    f"{source}: class id {class_id} is claimed by both {seen[class_id]!r} and {task.name!r}; every "
                    "class belongs to exactly one task."
                )
            seen[class_id] = task.name


def select_tasks(index: RunIndex, tasks: list[str] | None) -> list[TaskEntry]:
    """The index entries of `tasks` (all when None), in run order; unknown names raise listing the known ones."""
    if tasks is None:
        return list(index.tasks)
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(name, str) for name in tasks):
        raise TypeError(f"`tasks` must be None, a task name or a list of them, got {tasks!r}; e.g. ['task_0'].")
    unknown = [name for name in tasks if name not in index.task_names]
    if unknown:
        raise ValueError(f"`tasks` names {unknown}, which the run does not have; its tasks are {index.task_names}.")
    return [task for task in index.tasks if task.name in tasks]


def verify_file(folder: Path, relpath: str, index: RunIndex) -> None:
    """Check that `relpath` exists and its sha256 matches the index."""
    path = folder / relpath
    if not path.is_file():
        raise ValueError(f"{path} is missing.")
    expected = index.sha256.get(relpath)
    if expected is None:
        raise ValueError(f"{relpath} has no sha256 in {INDEX_FILE}; refusing to load an unlisted file.")
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(
            f"{path}: sha256 {actual[:12]}... does not match {expected[:12]}... in {INDEX_FILE}; the file was changed "
            "or corrupted. Download it again."
        )


def _required_files(index: RunIndex, sub: str, names: tuple[str, ...]) -> list[str]:
    """The files of `sub` the index must hash: the weights always, every other file in format 2."""
    required = [f"{sub}/{names[0]}"]
    if index.format_version >= 2:
        required += [f"{sub}/{name}" for name in names[1:]]
    listed = sorted(k for k in index.sha256 if k.startswith(sub + "/"))
    return sorted(set(required) | set(listed))


def load_backbone(folder: str | os.PathLike, index: RunIndex | None = None, torch_dtype=None) -> UNet2DModel:
    """The run's base UNet2DModel, from safetensors only, after checking the sha256 of its weights and config."""
    folder = Path(folder)
    index = index or read_index(folder)
    for relpath in _required_files(index, index.backbone, (BACKBONE_WEIGHTS, BACKBONE_CONFIG)):
        verify_file(folder, relpath, index)
    try:
        return UNet2DModel.from_pretrained(folder / index.backbone, use_safetensors=True, torch_dtype=torch_dtype)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{folder / index.backbone} is no loadable UNet2DModel ({error}).") from None


def check_scheduler(scheduler, argument: str = "scheduler") -> None:
    """Refuse a scheduler `FunLoRAPipeline` cannot sample with (it integrates the flow-matching ODE)."""
    if not isinstance(scheduler, SCHEDULER_CLASSES):
        names = " or ".join(cls.__name__ for cls in SCHEDULER_CLASSES)
        raise TypeError(
            f"`{argument}` must be a flow-matching scheduler, {names}, got {type(scheduler).__name__}: FunLoRA's "
            "models predict a velocity. Pass e.g. FlowMatchEulerDiscreteScheduler()."
        )


def load_scheduler(folder: str | os.PathLike, index: RunIndex | None = None):
    """The run's flow-matching scheduler (`scheduler/`, written by `FunLoRAPipeline.save_pretrained`), or None."""
    folder = Path(folder)
    index = index or read_index(folder)
    relpath = f"{SCHEDULER_SUBFOLDER}/scheduler_config.json"
    if relpath not in index.sha256:
        return None
    verify_file(folder, relpath, index)
    config = read_json(folder / relpath)
    kinds = {cls.__name__: cls for cls in SCHEDULER_CLASSES}
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind not in kinds:
        raise ValueError(f"{folder / relpath}: scheduler {kind!r} is none of the flow-matching ones {sorted(kinds)}.")
    return kinds[kind].from_config(config)


def read_adapter(folder: Path, task: TaskEntry, index: RunIndex) -> tuple[FunLoRAConfig, dict[str, torch.Tensor]]:
    """The config and tensors of one task's adapter, after the sha256 and consistency checks."""
    sub = folder / task.name
    for relpath in _required_files(index, task.name, (ADAPTER_WEIGHTS, ADAPTER_CONFIG)):
        verify_file(folder, relpath, index)
    try:
        config = FunLoRAConfig.from_pretrained(sub)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{sub / ADAPTER_CONFIG} is no readable FunLoRA adapter config ({error}).") from None
    if list(config.class_ids) != list(task.class_ids):
        raise ValueError(
            f"{sub / ADAPTER_CONFIG}: class_ids {config.class_ids} differ from {task.class_ids} in {INDEX_FILE} "
            "(the order matters: row k of every tensor is the k-th class)."
        )
    tensors = {}
    try:
        with safe_open(sub / ADAPTER_WEIGHTS, framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
        raise ValueError(f"{sub / ADAPTER_WEIGHTS} cannot be read as safetensors ({error}).") from None
    return config, tensors


def attach_tasks(
    unet: UNet2DModel, folder: str | os.PathLike, tasks: list[str] | None = None, index: RunIndex | None = None
) -> PeftModel:
    """Wrap `unet` in a PeftModel holding the adapters of `tasks` (all when None), each checked before it is attached.

    Every adapter file is verified (sha256), its tensors checked against the UNet's convs (names, shapes, floating
    dtype, finite values) before any is attached; on any failure the UNet is left as it was. `unet` is a plain UNet:
    one that holds FunLoRA adapters already is refused (load more tasks into its model with `load_adapter`).
    """
    folder = Path(folder)
    held = sorted({name for module in unet.modules() if isinstance(module, FunLoRALayer) for name in module.funlora_a})
    if held:
        raise ValueError(
            f"`unet` holds FunLoRA adapters already ({held}): attach_tasks wraps a plain UNet2DModel. Pass the run's "
            "backbone (load_backbone(folder)), or load the tasks into the existing model with "
            "model.load_adapter(folder / task_name, adapter_name=task_name)."
        )
    index = index or read_index(folder)
    entries = select_tasks(index, tasks)
    if not entries:
        raise ValueError("`tasks` is empty: name at least one task to load.")
    loaded = [(task, *read_adapter(folder, task, index)) for task in entries]
    model = None
    with requires_grad_restored_on_failure(unet):  # wrapping froze the UNet's parameters
        try:
            for task, config, tensors in loaded:
                config.inference_mode = True
                if model is None:
                    model = get_peft_model(unet, config, adapter_name=task.name)
                else:
                    model.add_adapter(task.name, config)
                try:
                    load_adapter_tensors(model, task.name, tensors)
                except ValueError as error:
                    raise ValueError(f"{folder / task.name / ADAPTER_WEIGHTS}: {error}") from None
        except Exception:
            if model is not None:
                model.base_model.unload()
            raise
    model.eval()
    return model


# --------------------------------------------------------------------------------------------------------------------
# Writing a run
# --------------------------------------------------------------------------------------------------------------------


def funlora_tuner(model: nn.Module) -> FunLoRAModel:
    """The FunLoRA tuner of `model`: a `PeftModel` of FunLoRA adapters, the tuner itself, or a UNet they adapt."""
    if isinstance(model, PeftModel):
        model = model.base_model
    tuner = model if isinstance(model, FunLoRAModel) else _router_of(model)
    if not isinstance(tuner, FunLoRAModel) or tuner._unloaded:
        raise TypeError(
            f"expected a model holding FunLoRA adapters (get_peft_model(unet, FunLoRAConfig(...))), got "
            f"{type(model).__name__} without any."
        )
    return tuner


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapted UNet's own tensors under plain `UNet2DModel` names (adapter tensors and `.base_layer` removed)."""
    unet = funlora_tuner(model).model
    state = {}
    for key, tensor in unet.state_dict().items():
        if FunLoRAModel.prefix in key:
            continue
        state[key.replace(".base_layer.", ".")] = tensor.detach()
    return state


def save_backbone(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Save the base UNet of `model` as a plain `UNet2DModel` (config + safetensors) into `folder`, atomically."""
    unet = funlora_tuner(model).model
    plain = UNet2DModel.from_config(unet.config)
    plain.load_state_dict({k: v.cpu() for k, v in backbone_state_dict(model).items()}, strict=True)
    return write_folder_atomic(folder, lambda tmp: plain.save_pretrained(tmp, safe_serialization=True))


def save_adapter(model: nn.Module, adapter_name: str, folder: str | os.PathLike) -> Path:
    """Save one adapter in PEFT's format to `folder/adapter_name`, atomically.

    The files `PeftModel.save_pretrained` writes (`adapter_model.safetensors` with keys
    `base_model.model.<conv>.funlora_a` ..., `adapter_config.json` in inference mode), read back by
    `PeftModel.from_pretrained` and `load_adapter` as by `attach_tasks`; written from the adapter's own tensors, so
    saving one adapter of many visits only them.
    """
    tuner = funlora_tuner(model)
    config = copy.deepcopy(tuner._all_configs()[adapter_name])
    config.inference_mode = True
    tensors = {
        key: param.detach().to("cpu").contiguous()
        for key, param in adapter_parameters(tuner.model, adapter_name).items()
    }

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config.save_pretrained(tmp)

    return write_folder_atomic(Path(folder) / adapter_name, write)


def read_metrics(folder: str | os.PathLike) -> ContinualMetrics | None:
    """The run's `metrics.json`, or None when it has none."""
    return _read_record(Path(folder) / METRICS_FILE, ContinualMetrics.from_dict)


def write_metrics(folder: str | os.PathLike, metrics: ContinualMetrics) -> Path:
    """Write `metrics.json`, atomically."""
    return write_json_atomic(Path(folder) / METRICS_FILE, metrics.to_dict())


def read_importance(folder: str | os.PathLike) -> ImportanceRecord | None:
    """The run's `importance.json` (layer scores and the selected convs), or None when it has none."""
    remedy = "delete it to select the layers again"
    return _read_record(Path(folder) / IMPORTANCE_FILE, ImportanceRecord.from_dict, remedy)


def write_importance(folder: str | os.PathLike, importance: ImportanceRecord, plot=None) -> Path:
    """Write `importance.json` and, given a matplotlib figure `plot`, `importance.png`, atomically."""
    folder = Path(folder)
    if plot is not None:
        write_file_atomic(folder / IMPORTANCE_PLOT, lambda tmp: plot.savefig(tmp, format="png", dpi=120))
    return write_json_atomic(folder / IMPORTANCE_FILE, importance.to_dict())


def write_sample_grid(folder: str | os.PathLike, task: str, picture) -> Path:
    """Write the PIL image `picture` as `samples/after_<task>.png`, atomically."""
    return write_file_atomic(Path(folder) / sample_grid_path(task), lambda tmp: picture.save(tmp, format="PNG"))


def latest_sample_grid(folder: str | os.PathLike, index: RunIndex) -> str | None:
    """The grid of the last task of `index` whose `samples/after_<task>.png` exists in `folder`, or None."""
    for task in reversed(index.tasks):
        if (Path(folder) / sample_grid_path(task)).is_file():
            return sample_grid_path(task)
    return None


def run_outputs(folder: str | os.PathLike) -> list[str]:
    """Names of the run files and folders in `folder` (what `save_run` and training write), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    known = {INDEX_FILE, METRICS_FILE, BACKBONE_SUBFOLDER, SAMPLES_SUBFOLDER, IMPORTANCE_FILE, IMPORTANCE_PLOT}
    return sorted(
        path.name
        for path in folder.iterdir()
        if path.name in known or (path.is_dir() and path.name.startswith((CHECKPOINT_PREFIX, TASK_PREFIX)))
    )


def save_run(
    model: nn.Module,
    folder: str | os.PathLike,
    adapter_names: Iterable[str] | None = None,
    *,
    save_backbone_weights: bool | None = None,
    class_names: dict[int, str] | None = None,
    metrics: ContinualMetrics | None = None,
    importance: ImportanceRecord | None = None,
    scheduler=None,
) -> RunIndex:
    """Write `model` as a run folder: the mirror of `FunLoRAPipeline.from_pretrained(folder)`.

    Writes the backbone (once), one folder per adapter, and the index `funlora.json` listing every adapter of the model
    in order, with its class ids, function and targets from its config and the sha256 of every file; then
    `metrics.json`, `importance.json` and the scheduler's config when given. Every file is written atomically.

    Args:
        model: a `PeftModel` holding FunLoRA adapters (one per task), or the UNet they adapt.
        folder: the run folder (created if needed).
        adapter_names: the adapters whose folders are (re)written; default: every adapter of the model. The index
            always lists all of them, so the folders of the others must already be in `folder`.
        save_backbone_weights: write `backbone/`; default (None): when the folder has no backbone yet.
        class_names: `{class id: name}` for the index (default: the folder's index's, if any).
        metrics, importance: the evaluation and layer-importance records to write.
        scheduler: a diffusers scheduler whose config goes to `scheduler/` (what `FunLoRAPipeline` samples with).

    Returns:
        The index as written.
    """
    try:
        tuner = funlora_tuner(model)
    except TypeError as error:
        raise TypeError(f"save_run: {error}") from None
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_run: {folder} is a file, not a folder; pass the run folder to write.")
    configs = tuner._all_configs()
    names = list(configs) if adapter_names is None else list(adapter_names)
    unknown = [name for name in names if name not in configs]
    if unknown:
        raise ValueError(f"adapter_names {unknown} are not adapters of the model; it has {list(configs)}.")
    missing = [n for n in configs if n not in names and not (folder / n / ADAPTER_WEIGHTS).is_file()]
    if missing:
        raise ValueError(
            f"adapter_names {names} leaves out {missing}, whose folders {folder} lacks: the index lists every adapter "
            "of the model. Save them too (adapter_names=None saves all)."
        )
    _check_class_names(class_names)
    records = ((metrics, ContinualMetrics, "metrics"), (importance, ImportanceRecord, "importance"))
    for value, kind, argument in records:
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"save_run: `{argument}` must be a {kind.__name__} or None, got {type(value).__name__}.")
    if scheduler is not None:
        check_scheduler(scheduler)
    if class_names is None and (folder / INDEX_FILE).is_file():
        class_names = read_index(folder).class_names
    folder.mkdir(parents=True, exist_ok=True)
    if save_backbone_weights or (save_backbone_weights is None and not (folder / BACKBONE_SUBFOLDER).is_dir()):
        save_backbone(tuner, folder / BACKBONE_SUBFOLDER)
    for name in names:
        save_adapter(tuner, name, folder)
    if scheduler is not None:
        write_folder_atomic(folder / SCHEDULER_SUBFOLDER, lambda tmp: scheduler.save_config(tmp))
    write_index(folder, [TaskEntry.from_config(name, config) for name, config in configs.items()], class_names)
    if metrics is not None:
        write_metrics(folder, metrics)
    if importance is not None:
        write_importance(folder, importance)
    return read_index(folder)
