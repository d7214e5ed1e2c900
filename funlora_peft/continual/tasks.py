"""Class-incremental task layout (method.md §1): the classes cut into tasks, and one task's images.

`make_task_layout` cuts the class ids into tasks (e.g. CIFAR-100 "20-20": 5 tasks of 20 classes) and `task_dataset`
takes the images of some classes as a `TensorDataset` of `(image, label)`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .data import ImageClassificationData, _check_int

__all__ = ["make_task_layout", "parse_class_order", "task_dataset"]

_CLASS_ORDER_CHOICES = ("sorted", "shuffle")


def parse_class_order(class_order: str | Sequence[int] | None) -> str | list[int] | None:
    """Normalise a class order from the CLI or Python: `None`, `"shuffle"`, or a list of class ids.

    `"sorted"` and `""` mean `None` (ascending class ids); `"3,1,2"` becomes `[3, 1, 2]`.

    Example:
        ```py
        >>> parse_class_order("3, 1,2"), parse_class_order("shuffle"), parse_class_order(None)
        ([3, 1, 2], 'shuffle', None)
        ```
    """
    if class_order is None:
        return None
    if isinstance(class_order, str):
        text = class_order.strip()
        if text in ("", "sorted"):
            return None
        if text == "shuffle":
            return "shuffle"
        try:
            return [int(item) for item in text.split(",")]
        except ValueError:
            raise ValueError(
                f"class_order={class_order!r} is neither one of {list(_CLASS_ORDER_CHOICES)} nor a comma-separated "
                f"list of class ids such as '3,1,2'."
            ) from None
    if isinstance(class_order, torch.Tensor):
        class_order = class_order.tolist()
    if not isinstance(class_order, Sequence):
        raise TypeError(
            f"class_order must be None, 'sorted', 'shuffle', a comma-separated string or a sequence of class ids, "
            f"got {type(class_order).__name__}: {class_order!r}."
        )
    order = []
    for item in class_order:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise TypeError(
                f"class_order must contain integer class ids, got {item!r} in class_order={class_order!r}."
            )
        order.append(int(item))
    return order


def make_task_layout(
    class_ids: Iterable[int],
    *,
    classes_per_task: int,
    first_task_classes: int | None = None,
    class_order: str | Sequence[int] | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Cut class ids into the tasks of a class-incremental run (method.md §1).

    The classes are ordered (`class_order`), then the first `first_task_classes` form task 0 and every following
    `classes_per_task` form one task, e.g. CIFAR-100 "20-20" is `classes_per_task=20` (5 tasks of 20).

    Args:
        class_ids: the class ids the data has, e.g. `ImageClassificationData.class_ids`.
        classes_per_task: classes in every task after the first (and in the first one too unless
            `first_task_classes` is set).
        first_task_classes: classes in task 0 (default: `classes_per_task`).
        class_order: `None` or `"sorted"` (ascending ids), `"shuffle"` (shuffled with `seed`), or an explicit
            list of class ids (or the same as a comma-separated string, e.g. `"3,1,2,0"`). An explicit order may
            list a subset of the classes; the others are left out of every task (with a warning).
        seed: seed of the `"shuffle"` order.

    Returns:
        `tasks`, with `tasks[t]` the class ids of task `t` in order.

    Example:
        ```py
        >>> make_task_layout(range(10), classes_per_task=2, first_task_classes=4)
        [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
        ```
    """
    if isinstance(class_ids, torch.Tensor):
        class_ids = class_ids.tolist()
    available = [int(class_id) for class_id in class_ids]
    if len(set(available)) != len(available):
        raise ValueError(f"class_ids must be distinct, got duplicates in {available}.")
    if not available:
        raise ValueError("class_ids is empty: there are no classes to cut into tasks.")
    available = sorted(available)
    _check_int("classes_per_task", classes_per_task, minimum=1, remedy="e.g. classes_per_task=2")
    if first_task_classes is not None:
        _check_int("first_task_classes", first_task_classes, minimum=1, remedy="or leave it None")
    _check_int("seed", seed, minimum=0, remedy="pass an integer seed, e.g. 0")

    order = parse_class_order(class_order)
    if order is None:
        order = available
    elif order == "shuffle":
        order = [available[i] for i in np.random.default_rng(seed).permutation(len(available))]
    else:
        unknown = [class_id for class_id in order if class_id not in set(available)]
        repeated = sorted(class_id for class_id, count in Counter(order).items() if count > 1)
        if unknown or repeated:
            problem = f"names class ids {unknown} that the data lacks" if unknown else f"lists class ids {repeated}"
            raise ValueError(
                f"class_order {problem}{'' if unknown else ' more than once'}; available class ids: {available}, "
                "each in one task at most."
            )
        if not order:
            raise ValueError("class_order is empty; list at least one class id, or pass None or 'shuffle'.")
        left_out = sorted(set(available) - set(order))
        if left_out:
            warnings.warn(
                f"class_order lists {len(order)} of the {len(available)} classes; classes {left_out} are left out "
                f"of every task.",
                stacklevel=2,
            )

    num_classes = len(order)
    first = classes_per_task if first_task_classes is None else first_task_classes
    if first > num_classes or (num_classes - first) % classes_per_task != 0:
        raise ValueError(_layout_error(num_classes, classes_per_task, first_task_classes))
    tasks = [order[:first]]
    tasks += [order[start : start + classes_per_task] for start in range(first, num_classes, classes_per_task)]
    return tasks


def _layout_error(num_classes: int, classes_per_task: int, first_task_classes: int | None) -> str:
    """The message for a layout that does not divide the classes, with the settings that would."""
    first = classes_per_task if first_task_classes is None else first_task_classes
    if first > num_classes:
        return (
            f"first_task_classes={first_task_classes} exceeds the {num_classes} classes; pass at most "
            f"first_task_classes={num_classes}."
        )
    # Tasks after the first cut the rest; without first_task_classes every task, the first included, has the size.
    rest = num_classes if first_task_classes is None else num_classes - first
    valid_sizes = [size for size in range(1, rest + 1) if rest % size == 0]
    valid_firsts = [first for first in range(1, num_classes + 1) if (num_classes - first) % classes_per_task == 0]
    problem = (
        f"classes_per_task={classes_per_task} does not divide the {num_classes} classes into equal tasks"
        if first_task_classes is None
        else f"after first_task_classes={first_task_classes}, the remaining {rest} of {num_classes} classes cannot "
        f"be cut into tasks of classes_per_task={classes_per_task}"
    )
    return (
        f"{problem}. Valid classes_per_task: {valid_sizes}; or keep classes_per_task={classes_per_task} and set "
        f"first_task_classes to one of {valid_firsts}."
    )


def task_dataset(data: ImageClassificationData, class_ids: Iterable[int], split: str = "train") -> TensorDataset:
    """The images of some classes as a `TensorDataset` of `(image, label)` pairs, in dataset order.

    Images are `(num_channels, resolution, resolution)` in [-1, 1], labels int64 global class ids. Use the current
    task's classes and `split="train"` for training, and all classes seen so far with `split="test"` for the
    Classification Accuracy Score (method.md §5).

    Example:
        ```py
        >>> data = load_image_classification_data("digits")
        >>> tasks = make_task_layout(data.class_ids, classes_per_task=2)
        >>> loader = torch.utils.data.DataLoader(task_dataset(data, tasks[0]), batch_size=64, shuffle=True)
        ```
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got split={split!r}.")
    images, labels = (
        (data.train_images, data.train_labels) if split == "train" else (data.test_images, data.test_labels)
    )
    if isinstance(class_ids, torch.Tensor):
        class_ids = class_ids.tolist()
    wanted = [int(class_id) for class_id in class_ids]
    if not wanted:
        raise ValueError("class_ids is empty; pass the class ids of a task, e.g. make_task_layout(...)[0].")
    unknown = sorted(set(wanted) - set(data.class_ids))
    if unknown:
        raise ValueError(
            f"class_ids {unknown} are not classes of {data.name!r}; available class ids: {data.class_ids}."
        )
    mask = torch.isin(labels, torch.tensor(wanted, dtype=labels.dtype))
    return TensorDataset(images[mask], labels[mask])
