"""The layout of a FunLoRA run: one folder (or Hub model repo) holding a backbone and one adapter per task.

```
funlora.json         index: format version, tasks in order with their class ids, function, p, target layers,
                     backbone subfolder, class names, sha256 of every safetensors file
backbone/            UNet2DModel config + diffusion_pytorch_model.safetensors
task_0/, task_1/...  adapter_config.json + adapter_model.safetensors
```

The training script writes this layout and the Hub helpers upload it as is, so a run folder and a Hub repo are
interchangeable. Everything here reads safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DModel
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors import safe_open

from .tuner.config import FunLoRAConfig
from .tuner.model import check_adapter_state_dict

FORMAT_VERSION = 1
INDEX_FILE = "funlora.json"
BACKBONE_SUBFOLDER = "backbone"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class TaskEntry:
    """One task of a run: the adapter subfolder `name` and the global class ids it owns."""

    name: str
    class_ids: list[int]
    function: str
    num_functions: int
    target_modules: list[str] | str | None = None


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


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_index(folder: str | os.PathLike, tasks: list[TaskEntry], class_names: dict[int, str] | None = None) -> Path:
    """Write `funlora.json` for `folder`, hashing the backbone's and every task's safetensors files.

    Written to a temporary file first and renamed, so a reader never sees half an index.
    """
    folder = Path(folder)
    index = RunIndex(tasks=list(tasks), class_names=dict(class_names or {}))
    _check_unique_classes(index, source=str(folder / INDEX_FILE))
    subfolders = [BACKBONE_SUBFOLDER] + [task.name for task in tasks]
    for sub in subfolders:
        for path in sorted((folder / sub).glob("*.safetensors")):
            index.sha256[path.relative_to(folder).as_posix()] = sha256_of(path)
    tmp = folder / (INDEX_FILE + ".tmp")
    tmp.write_text(index.to_json())
    os.replace(tmp, folder / INDEX_FILE)
    return folder / INDEX_FILE


def read_index(folder: str | os.PathLike) -> RunIndex:
    """Read and check `funlora.json`: known format version, well-formed tasks, class ids unique across tasks."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise ValueError(
            f"{path} not found: a FunLoRA run folder holds {INDEX_FILE}, {BACKBONE_SUBFOLDER}/ and one folder per "
            "task, as written by examples/train.py."
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from None
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unknown format_version {version!r}; this version of funlora-peft reads format {FORMAT_VERSION}. "
            "Upgrade funlora-peft or re-export the run."
        )
    try:
        tasks = [TaskEntry(**task) for task in data["tasks"]]
        index = RunIndex(
            format_version=version,
            backbone=data.get("backbone", BACKBONE_SUBFOLDER),
            tasks=tasks,
            class_names={int(k): v for k, v in data.get("class_names", {}).items()},
            sha256=dict(data.get("sha256", {})),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is malformed ({err!r}).") from None
    _check_unique_classes(index, source=str(path))
    return index


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


def load_backbone(folder: str | os.PathLike, index: RunIndex | None = None, torch_dtype=None) -> UNet2DModel:
    """The run's base UNet2DModel, from safetensors only, after checking its sha256."""
    folder = Path(folder)
    index = index or read_index(folder)
    for relpath in [k for k in index.sha256 if k.startswith(index.backbone + "/")]:
        verify_file(folder, relpath, index)
    return UNet2DModel.from_pretrained(folder / index.backbone, use_safetensors=True, torch_dtype=torch_dtype)


def read_adapter(folder: Path, task: TaskEntry, index: RunIndex) -> tuple[FunLoRAConfig, dict[str, torch.Tensor]]:
    """The config and tensors of one task's adapter, after the sha256 and consistency checks."""
    sub = folder / task.name
    relpath = f"{task.name}/{ADAPTER_WEIGHTS}"
    verify_file(folder, relpath, index)
    config = FunLoRAConfig.from_pretrained(sub)
    if sorted(config.class_ids) != sorted(task.class_ids):
        raise ValueError(
            f"{sub / ADAPTER_CONFIG}: class_ids {config.class_ids} differ from {task.class_ids} in {INDEX_FILE}."
        )
    tensors = {}
    with safe_open(sub / ADAPTER_WEIGHTS, framework="pt") as handle:
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    return config, tensors


def attach_tasks(
    unet: UNet2DModel, folder: str | os.PathLike, tasks: list[str] | None = None, index: RunIndex | None = None
) -> PeftModel:
    """Wrap `unet` in a PeftModel holding the adapters of `tasks` (all when None), each checked before it is attached.

    Every adapter file is verified (sha256), its tensors checked against the UNet's convs (names, shapes, floating
    dtype, finite values) before any is attached; on any failure the UNet is left as it was.
    """
    folder = Path(folder)
    index = index or read_index(folder)
    entries = select_tasks(index, tasks)
    if not entries:
        raise ValueError("`tasks` is empty: name at least one task to load.")
    loaded = [(task, *read_adapter(folder, task, index)) for task in entries]
    model = None
    try:
        for task, config, tensors in loaded:
            config.inference_mode = True
            if model is None:
                model = get_peft_model(unet, config, adapter_name=task.name)
            else:
                model.add_adapter(task.name, config)
            problem = check_adapter_state_dict(model, task.name, tensors)
            if problem is not None:
                raise ValueError(f"{folder / task.name / ADAPTER_WEIGHTS}: {problem}")
            set_peft_model_state_dict(model, tensors, adapter_name=task.name)
    except Exception:
        if model is not None:
            model.base_model.unload()
        raise
    model.eval()
    return model
