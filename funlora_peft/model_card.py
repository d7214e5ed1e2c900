"""The model card (README.md) of a FunLoRA run, written with huggingface_hub's `ModelCard` / `ModelCardData`.

The same card is written into a run folder (`write_model_card`) and pushed with it (`funlora_peft.hub.push_to_hub`),
so a run folder and a Hub repo stay interchangeable. Its metadata:

- `library_name: funlora-peft`: the Hub shows a library's "Use this model" snippet from this field. A run is neither a
  diffusers pipeline (no `model_index.json`: `DiffusionPipeline.from_pretrained` fails on it) nor a single PEFT adapter
  on a base model, so "diffusers" or "peft" would advertise a snippet that does not work; the card carries its own.
  `diffusers` and `peft` are in the tags, so the repo is still found under them.
- `pipeline_tag: unconditional-image-generation` (the Hub has no class-conditional image generation task),
  `tags`, and `license` / `base_model` when given.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .continual.evaluation import ContinualMetrics, TaskMetrics
from .continual.importance import ImportanceRecord
from .run_folder import (
    IMPORTANCE_PLOT,
    MODEL_CARD_FILE,
    RunIndex,
    latest_sample_grid,
    read_importance,
    read_index,
    read_metrics,
    write_file_atomic,
)

LIBRARY_NAME = "funlora-peft"
PIPELINE_TAG = "unconditional-image-generation"
TAGS = ["funlora", "peft", "diffusers", "continual-learning", "flow-matching"]


def metrics_for_card(folder: str | os.PathLike) -> ContinualMetrics | None:
    """The run's metrics for its card: None without `metrics.json`; an unreadable one is left out with a warning."""
    try:
        return read_metrics(folder)
    except ValueError as error:
        warnings.warn(f"{error} The model card leaves the metrics out.", stacklevel=2)
        return None


def _metrics_row(metrics: ContinualMetrics | None, position: int) -> TaskMetrics | None:
    """The row of the task at `position` in the run."""
    for row in metrics.tasks if metrics is not None else []:
        if row.task == position:
            return row
    return None


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v, 3) for v in value) + "]"
    return str(value)


def build_model_card(
    index: RunIndex,
    repo_id: str | None = None,
    metrics: ContinualMetrics | None = None,
    sample_grid: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
    importance: ImportanceRecord | None = None,
    importance_plot: str | None = None,
) -> ModelCard:
    """The card of a run whose index is `index` (only the tasks listed there are described).

    Args:
        index: the run's index; the card's task table lists its tasks in run order.
        repo_id: Hub repo id (or folder) shown in the usage snippet; a placeholder when None.
        metrics: the run's `metrics.json` (`funlora_peft.run_folder.read_metrics`); rows of tasks not in `index` are
            left out. No metrics section when None.
        sample_grid: path, relative to the repo root, of a sample grid PNG to show.
        license, base_model: card metadata, left out when None.
        importance: the run's `importance.json` (layer scores and the layers tasks 1, 2, ... adapt), shown when
            the index has more than one task; `importance_plot`: path of its bar plot.

    Example:

        ```py
        >>> from funlora_peft.model_card import build_model_card
        >>> from funlora_peft.run_folder import read_index
        >>> card = build_model_card(read_index("runs/digits"), repo_id="me/funlora-digits", license="apache-2.0")
        >>> card.data.library_name
        'funlora-peft'
        ```
    """
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        tags=list(TAGS),
        pipeline_tag=PIPELINE_TAG,
        license=license,
        base_model=base_model,
    )
    repo = repo_id or "<user>/<repo>"
    names = index.task_names
    lines = [
        f"# FunLoRA run: {len(names)} task(s), {sum(len(t.class_ids) for t in index.tasks)} classes",
        "",
        "A class-incremental flow-matching generator: a `UNet2DModel` backbone (`backbone/`) and one FunLoRA adapter "
        "per task (`task_k/`), written by funlora-peft. Each adapter "
        "holds the rank-1 functional adapters of its classes only; loading a subset of the tasks gives bit-identical "
        "samples for their classes. `funlora.json` indexes the tasks and the sha256 of every weight file, which the "
        "loader checks.",
        "",
        "## Tasks",
        "",
        "| task | class ids | class names | function |",
        "|---|---|---|---|",
    ]
    for task in index.tasks:
        class_names = ", ".join(index.class_names.get(c, "?") for c in task.class_ids) if index.class_names else "-"
        ids = ", ".join(str(c) for c in task.class_ids)
        lines.append(f"| `{task.name}` | {ids} | {class_names} | {task.function} (p={task.num_functions}) |")

    rows = [(i, task, _metrics_row(metrics, i)) for i, task in enumerate(index.tasks)]
    rows = [(i, task, row) for i, task, row in rows if row is not None]
    if rows:
        lines += ["", "## Metrics after each task", ""]
        real = metrics.real_data_accuracy
        if real is not None:
            lines += [f"Classifier accuracy on real data: {_fmt(real)}.", ""]
        lines += [
            "| after task | CAS | accuracy per task | FD | train seconds | extra parameters per class |",
            "|---|---|---|---|---|---|",
        ]
        for _, task, row in rows:
            lines.append(
                f"| `{task.name}` | {_fmt(row.cas)} | {_fmt(row.accuracy_per_task)} | {_fmt(row.fd, 3)} | "
                f"{_fmt(row.train_seconds, 1)} | {_fmt(row.extra_parameters_per_class)} |"
            )
    if importance is not None and len(index.tasks) > 1:
        scores, selected = importance.scores, importance.selected
        lines += [
            "",
            "## Layer importance",
            "",
            f"Tasks after `task_0` adapt {len(selected)} of the {len(scores)} convs (selection "
            f"`{importance.select_layers}`), those with the largest |I_l|, the mean rescaling F of the layer, "
            f"scored from {importance.detail}.",
            "",
            "| layer | I_l |",
            "|---|---:|",
        ]
        lines += [f"| `{name}` | {scores.get(name, float('nan')):+.4f} |" for name in selected]
        if importance_plot is not None:
            lines += ["", f"![layer importance]({importance_plot})"]
    if sample_grid is not None:
        lines += ["", "## Samples", "", f"One row per class, after `{names[-1]}`:", "", f"![samples]({sample_grid})"]

    tasks_arg = ", ".join(f'"{name}"' for name in names[:2])
    some_class = index.tasks[0].class_ids[0] if index.tasks and index.tasks[0].class_ids else 0
    lines += [
        "",
        "## Usage",
        "",
        "```py",
        "import torch",
        "from funlora_peft.pipeline import FunLoRAPipeline",
        "",
        "# downloads the backbone and the named tasks only",
        f'pipe = FunLoRAPipeline.from_pretrained("{repo}", tasks=[{tasks_arg}])',
        "generator = torch.manual_seed(0)",
        f"images = pipe(class_labels=[{some_class}] * 8, num_inference_steps=20, generator=generator).images",
        "```",
        "",
        "or from the command line:",
        "",
        "```bash",
        f"funlora sample {repo} --classes {some_class} --num_samples 8 --output grid.png",
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(
    output_dir: str | os.PathLike,
    repo_id: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Write the card of the run folder `output_dir` to `output_dir/README.md` (replacing any card there).

    Uses the folder's `funlora.json`, its `metrics.json` when present and the latest `samples/after_task_k.png`.

    Example:

        ```py
        >>> from funlora_peft.model_card import write_model_card
        >>> write_model_card("runs/digits", repo_id="me/funlora-digits", license="apache-2.0")
        PosixPath('runs/digits/README.md')
        ```
    """
    folder = Path(output_dir)
    index = read_index(folder)
    card = build_model_card(
        index,
        repo_id=repo_id,
        metrics=metrics_for_card(folder),
        sample_grid=latest_sample_grid(folder, index),
        license=license,
        base_model=base_model,
        importance=read_importance(folder),
        importance_plot=IMPORTANCE_PLOT if (folder / IMPORTANCE_PLOT).is_file() else None,
    )
    return write_file_atomic(folder / MODEL_CARD_FILE, lambda tmp: card.save(tmp))
