"""Evaluation of a continually trained class-conditional generator (method.md §5).

Everything here sees the generator only through the images it produced, so any model (FunLoRA adapters, a
fine-tuned U-Net, generative replay, joint training) is scored the same way. Images are float tensors of shape
`(batch, channels, height, width)` in `[-1, 1]`; labels are integer class ids of shape `(batch,)`.

Metrics:

- **CAS** (Classification Accuracy Score): a fresh `SmallClassifier` is trained ONLY on generated samples of
  the classes seen so far and tested on the REAL held-out test images of those classes
  (`classification_accuracy_score`); the same protocol on real training images is the upper bound
  (`real_data_accuracy`).
- **Recognition accuracy**: the fraction of generated samples of class `y` that a FIXED classifier trained once
  on real data labels `y` (`recognition_accuracy`). After every task `k` its per-task values form row `k` of an
  `AccuracyMatrix`, whose `forgetting` measures how much earlier tasks degraded.
- **Fréchet distance** between real and generated images in the penultimate feature space of the real-data
  classifier (`frechet_distance`), an FID whose feature network suits 8x8 to 32x32 images.

`generate_per_class` draws evaluation samples from any `sample_fn` with one seeded generator per class,
`evaluate_stage` combines everything for one point of the task sequence, and `ContinualEvaluator` does it after every
task of a run with one fixed real-data classifier. `TaskMetrics` (one task) and `ContinualMetrics` (the run: its rows,
accuracy matrix, forgetting and average CAS) are the records a run folder stores as `metrics.json`.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import to_model_range

SampleFn = Callable[[int, int, torch.Generator], Tensor]
"""`sample_fn(class_label, num_samples, generator) -> (num_samples, channels, height, width)` images in [-1, 1]."""

# Seeds of the per-class generators are `seed * _CLASS_SEED_STRIDE + class_id`; a prime larger than any label
# space we use keeps (seed, class) pairs from colliding.
_CLASS_SEED_STRIDE = 100003


# ----------------------------------------------------------------------------------------------------------------
# Classifier
# ----------------------------------------------------------------------------------------------------------------


_PROBE_SAMPLES = 4  # reuse_old_samples: fresh samples of every old class compared bit for bit after each task
_PROBE_SEED = 7919  # their seed offset


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: the output of an image must not depend on the rest of its batch, so
    # evaluation is independent of batch composition and train/eval behave the same.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.ReLU(inplace=True),
    )


class SmallClassifier(nn.Module):
    """A small CNN for `(batch, in_channels, resolution, resolution)` images in [-1, 1].

    Stages of two 3x3 conv + GroupNorm + ReLU blocks halve the resolution with average pooling until it is at
    most 4 (or odd); one more conv block, a flatten and a linear layer give the `feature_dim` penultimate
    features (`features`, used by `frechet_distance`), and a linear head gives `num_classes` logits.

    Example:
        >>> model = SmallClassifier(in_channels=1, num_classes=10, resolution=16)
        >>> model(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
        >>> model.features(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        resolution: int,
        base_channels: int = 16,
        max_channels: int = 64,
        feature_dim: int = 64,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("resolution", resolution),
            ("base_channels", base_channels),
            ("max_channels", max_channels),
            ("feature_dim", feature_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be at least 2 for a classifier, got {num_classes}.")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.resolution = resolution
        # torchmetrics' FrechetInceptionDistance reads this instead of probing the network with a dummy input.
        self.num_features = feature_dim

        layers: list[nn.Module] = []
        channels, size = in_channels, resolution
        width = base_channels
        while size > 4 and size % 2 == 0:
            layers += [_conv_block(channels, width), _conv_block(width, width), nn.AvgPool2d(2)]
            channels, size = width, size // 2
            width = min(2 * width, max_channels)
        layers.append(_conv_block(channels, width))
        self.body = nn.Sequential(*layers)
        self.to_features = nn.Sequential(nn.Flatten(), nn.Linear(width * size * size, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def _check_input(self, x: Tensor) -> None:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"SmallClassifier expects images of shape (batch, {', '.join(map(str, expected))}), got "
                f"{tuple(x.shape)}; resize the images or build the classifier with matching "
                "`in_channels`/`resolution`."
            )

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features: `(batch, channels, height, width) -> (batch, feature_dim)`."""
        self._check_input(x)
        return self.to_features(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits: `(batch, channels, height, width) -> (batch, num_classes)`."""
        return self.head(self.features(x))


def _module_device(module: nn.Module) -> torch.device:
    """Device of the first parameter or buffer of `module`; CPU for a module without any."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _check_images_labels(images: Tensor, labels: Tensor, num_classes: int | None = None, what: str = "") -> None:
    prefix = f"{what} " if what else ""
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{prefix}images must be a tensor of shape (batch, channels, height, width), got {shape}.")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            f"{prefix}labels must be a 1-D tensor with one label per image ({images.shape[0]}), got {shape}."
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{prefix}labels must be an integer tensor, got dtype {labels.dtype}.")
    if num_classes is not None and labels.numel() > 0:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{prefix}labels must lie in [0, num_classes={num_classes}), got values in [{low}, {high}]."
            )


def _random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to `max_shift` pixels in each direction (edges replicated)."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    shifts = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(shifts)])


def train_classifier(
    images: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    epochs: int = 15,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    augment: bool = False,
    device: str | torch.device | None = None,
) -> SmallClassifier:
    """Train a `SmallClassifier` with AdamW and a cosine learning-rate decay; returned in eval mode.

    Args:
        images: `(num_images, channels, height, width)` training images in [-1, 1], square.
        labels: `(num_images,)` integer labels in `[0, num_classes)`.
        num_classes: size of the classifier's output (the full label space, not only the labels present).
        epochs: passes over the data; ignored when `steps` is given.
        steps: exact number of optimisation steps (epochs are cycled); makes the compute budget independent of
            the dataset size, e.g. when the number of generated samples changes from task to task.
        batch_size: mini-batch size (the last, smaller batch of an epoch is kept).
        lr: peak learning rate, decayed to 0 by a cosine schedule.
        weight_decay: AdamW weight decay.
        seed: seeds the weight initialisation, the shuffling and the augmentation; the global RNG is left as it
            was, and the result is deterministic on CPU for a fixed number of threads.
        augment: random shifts of up to `max(1, resolution // 8)` pixels.
        device: where to train; defaults to the device of `images`.

    On a CPU with a few cores shared with other processes, `torch.set_num_threads(1)` trains this small network
    much faster than the default thread count.

    Example:
        >>> model = train_classifier(train_x, train_y, num_classes=10, epochs=20, seed=0)
        >>> accuracy(model, test_x, test_y)  # ~0.98 on sklearn's digits
    """
    _check_images_labels(images, labels, num_classes, what="training")
    if images.shape[0] == 0:
        raise ValueError("train_classifier got no training images; pass at least one image per class to learn.")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"Images must be square, got height {images.shape[-2]} and width {images.shape[-1]}.")
    if steps is None and epochs < 1:
        raise ValueError(f"`epochs` must be at least 1 when `steps` is None, got {epochs}.")
    if steps is not None and steps < 1:
        raise ValueError(f"`steps` must be at least 1, got {steps}; pass None to train for `epochs` instead.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    device = torch.device(device) if device is not None else images.device

    num_images = images.shape[0]
    steps_per_epoch = math.ceil(num_images / batch_size)
    total_steps = steps if steps is not None else epochs * steps_per_epoch
    resolution = images.shape[-1]
    max_shift = max(1, resolution // 8)

    # fork_rng keeps the caller's global RNG untouched while the weight init uses the seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallClassifier(images.shape[1], num_classes, resolution)
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    images, labels = images.detach().cpu(), labels.detach().long().cpu()  # converted batch by batch
    step = 0
    while step < total_steps:
        order = torch.randperm(num_images, generator=generator)
        for start in range(0, num_images, batch_size):
            index = order[start : start + batch_size]
            batch_x, batch_y = to_model_range(images[index]), labels[index]
            if augment:
                batch_x = _random_shift(batch_x, max_shift, generator)
            loss = F.cross_entropy(model(batch_x.to(device)), batch_y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == total_steps:
                break
    return model.eval()


@torch.no_grad()
def predict(
    model: nn.Module, images: Tensor, *, batch_size: int = 512, class_ids: Sequence[int] | None = None
) -> Tensor:
    """Predicted labels `(num_images,)` (on CPU) of `model` for `(num_images, channels, height, width)` images.

    With `class_ids`, the argmax is taken over those classes only (the other logits are masked out).
    """
    was_training = model.training
    model.eval()
    device = _module_device(model)
    predictions = []
    for start in range(0, images.shape[0], batch_size):
        logits = model(to_model_range(images[start : start + batch_size].to(device)))
        if class_ids is not None:
            mask = torch.full_like(logits, float("-inf"))
            mask[:, list(class_ids)] = 0.0
            logits = logits + mask
        predictions.append(logits.argmax(dim=1).cpu())
    model.train(was_training)
    if not predictions:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(predictions)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 512) -> float:
    """Fraction of `(num_images, channels, height, width)` images that `model` labels as `labels`.

    Example:
        >>> accuracy(model, test_x, test_y)
        0.98
    """
    _check_images_labels(images, labels)
    if images.shape[0] == 0:
        raise ValueError("accuracy got no images; it is undefined on an empty set.")
    predictions = predict(model, images, batch_size=batch_size)
    return (predictions == labels.cpu()).double().mean().item()


def _per_class_accuracy(predictions: Tensor, labels: Tensor, class_ids: Sequence[int]) -> dict[int, float]:
    """`{class_id: accuracy on the samples labelled class_id}`; NaN for a class without samples."""
    correct = predictions == labels
    result = {}
    for class_id in class_ids:
        selected = labels == class_id
        count = int(selected.sum())
        result[int(class_id)] = correct[selected].double().mean().item() if count else float("nan")
    return result


def _per_task_accuracy(predictions: Tensor, labels: Tensor, tasks: Sequence[Sequence[int]]) -> list[float]:
    """Accuracy pooled over the samples of each task's classes; NaN for a task without samples."""
    correct = predictions == labels
    result = []
    for task_classes in tasks:
        selected = torch.isin(labels, torch.as_tensor(list(task_classes), dtype=labels.dtype))
        result.append(correct[selected].double().mean().item() if bool(selected.any()) else float("nan"))
    return result


# ----------------------------------------------------------------------------------------------------------------
# Classification Accuracy Score
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CASResult:
    """Result of `classification_accuracy_score` (all accuracies are fractions in [0, 1])."""

    accuracy: float = field(metadata={"help": "Accuracy on the real test images of `class_ids`."})
    per_class_accuracy: dict[int, float] = field(metadata={"help": "Test accuracy of each class in `class_ids`."})
    class_ids: list[int] = field(metadata={"help": "Classes the classifier was trained and tested on."})
    num_train_samples: int = field(metadata={"help": "Training (generated) samples used, all of `class_ids`."})
    num_test_samples: int = field(metadata={"help": "Real test images of `class_ids`."})
    test_predictions: Tensor = field(repr=False, metadata={"help": "(num_test_samples,) predicted labels."})
    test_labels: Tensor = field(repr=False, metadata={"help": "(num_test_samples,) true labels."})

    def per_task_accuracy(self, tasks: Sequence[Sequence[int]]) -> list[float]:
        """Test accuracy pooled over each task's classes, e.g. `tasks=[[0, 1], [2, 3]]` -> `[acc_0, acc_1]`."""
        return _per_task_accuracy(self.test_predictions, self.test_labels, tasks)


def _select_classes(images: Tensor, labels: Tensor, class_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    keep = torch.isin(labels, torch.as_tensor(list(class_ids), dtype=labels.dtype, device=labels.device))
    return images[keep], labels[keep]


def _resolve_class_ids(class_ids: Sequence[int] | None, labels: Tensor, num_classes: int) -> list[int]:
    if class_ids is None:
        return sorted(int(c) for c in labels.unique().tolist())
    resolved = [int(c) for c in class_ids]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"`class_ids` must not repeat a class, got {resolved}.")
    bad = [c for c in resolved if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"`class_ids` must lie in [0, num_classes={num_classes}), got {bad}.")
    if not resolved:
        raise ValueError("`class_ids` is empty; pass the classes seen so far.")
    return sorted(resolved)


def classification_accuracy_score(
    generated_images: Tensor,
    generated_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    class_ids: Sequence[int] | None = None,
    epochs: int = 15,
    steps: int | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    augment: bool = False,
    device: str | torch.device | None = None,
) -> CASResult:
    """Classification Accuracy Score: train on generated samples only, test on real held-out images.

    CAS = (1 / |T|) sum_{(x, y) in T} [argmax_{c in class_ids} f_gen(x)_c == y], where `T` are the real test
    images of `class_ids` and `f_gen` is a fresh `SmallClassifier` trained by `train_classifier` ONLY on the
    generated samples of `class_ids` (samples of other classes are dropped). Restricting the argmax to
    `class_ids` makes the score that of a classifier over the classes seen so far.

    Args:
        generated_images: `(num_generated, channels, height, width)` generated images in [-1, 1].
        generated_labels: `(num_generated,)` the class each image was generated for.
        test_images: `(num_test, channels, height, width)` REAL held-out images in [-1, 1].
        test_labels: `(num_test,)` their labels.
        num_classes: size of the full label space.
        class_ids: the classes seen so far; defaults to the classes present in `generated_labels`.
        epochs, steps, batch_size, lr, seed, augment, device: passed to `train_classifier`.

    Example:
        >>> images, labels = generate_per_class(sample_fn, class_ids=range(4), samples_per_class=500, seed=0)
        >>> result = classification_accuracy_score(images, labels, test_x, test_y, num_classes=10)
        >>> result.accuracy, result.per_task_accuracy([[0, 1], [2, 3]])
    """
    _check_images_labels(generated_images, generated_labels, num_classes, what="generated")
    _check_images_labels(test_images, test_labels, num_classes, what="test")
    class_ids = _resolve_class_ids(class_ids, generated_labels, num_classes)
    train_x, train_y = _select_classes(generated_images, generated_labels, class_ids)
    test_x, test_y = _select_classes(test_images, test_labels, class_ids)
    missing_test = sorted(set(class_ids) - set(test_y.unique().tolist()))
    if missing_test:
        raise ValueError(f"The test set has no images of classes {missing_test}; CAS needs real test images of each.")
    missing_train = sorted(set(class_ids) - set(train_y.unique().tolist()))
    if len(missing_train) == len(class_ids):
        raise ValueError(f"No generated samples of the classes {class_ids}; nothing to train the CAS classifier on.")
    if missing_train:
        warnings.warn(
            f"No generated samples of classes {missing_train}; CAS counts their test images as errors.", stacklevel=2
        )
    model = train_classifier(
        train_x,
        train_y,
        num_classes=num_classes,
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        augment=augment,
        device=device,
    )
    predictions = predict(model, test_x, class_ids=class_ids)
    test_y = test_y.cpu().long()
    return CASResult(
        accuracy=(predictions == test_y).double().mean().item(),
        per_class_accuracy=_per_class_accuracy(predictions, test_y, class_ids),
        class_ids=class_ids,
        num_train_samples=int(train_x.shape[0]),
        num_test_samples=int(test_x.shape[0]),
        test_predictions=predictions,
        test_labels=test_y,
    )


def real_data_accuracy(
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    class_ids: Sequence[int] | None = None,
    **train_kwargs: Any,
) -> CASResult:
    """Upper bound of CAS: the same protocol with the REAL training images in place of generated ones.

    `train_kwargs` (epochs, steps, batch_size, lr, seed, augment, device) are those of
    `classification_accuracy_score`; use the same values for a fair bound.

    Example:
        >>> real_data_accuracy(train_x, train_y, test_x, test_y, num_classes=10, class_ids=range(4)).accuracy
    """
    return classification_accuracy_score(
        train_images,
        train_labels,
        test_images,
        test_labels,
        num_classes=num_classes,
        class_ids=class_ids,
        **train_kwargs,
    )


# ----------------------------------------------------------------------------------------------------------------
# Recognition accuracy and forgetting
# ----------------------------------------------------------------------------------------------------------------


def recognition_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 512) -> float:
    """Fraction of generated images of class `y` that a FIXED classifier (trained on real data) labels `y`.

    recognition = (1 / N) sum_i [argmax_c f_real(x_i)_c == y_i], the argmax over all of the classifier's classes.

    Example:
        >>> real_classifier = train_classifier(train_x, train_y, num_classes=10)
        >>> recognition_accuracy(real_classifier, generated_images, generated_labels)
    """
    return accuracy(classifier, images, labels, batch_size=batch_size)


def recognition_accuracy_per_class(
    classifier: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    class_ids: Sequence[int] | None = None,
    batch_size: int = 512,
) -> dict[int, float]:
    """`{class_id: recognition accuracy of the images labelled class_id}` (NaN for a class without images)."""
    _check_images_labels(images, labels)
    predictions = predict(classifier, images, batch_size=batch_size)
    labels = labels.cpu().long()
    if class_ids is None:
        class_ids = sorted(labels.unique().tolist())
    return _per_class_accuracy(predictions, labels, class_ids)


def recognition_accuracy_per_task(
    classifier: nn.Module, images: Tensor, labels: Tensor, tasks: Sequence[Sequence[int]], *, batch_size: int = 512
) -> list[float]:
    """Recognition accuracy pooled over the images of each task's classes, in task order.

    Example:
        >>> recognition_accuracy_per_task(real_classifier, images, labels, tasks=[[0, 1], [2, 3]])
        [0.97, 0.95]
    """
    _check_images_labels(images, labels)
    predictions = predict(classifier, images, batch_size=batch_size)
    return _per_task_accuracy(predictions, labels.cpu().long(), tasks)


def _check_accuracy_matrix(acc_matrix: Sequence[Sequence[float]]) -> None:
    for k, row in enumerate(acc_matrix):
        if len(row) < k + 1:
            raise ValueError(
                f"Row {k} of the accuracy matrix needs the accuracy of tasks 0..{k} ({k + 1} values), got "
                f"{len(row)}: {list(row)}."
            )


def forgetting(acc_matrix: Sequence[Sequence[float]]) -> float:
    """Average forgetting of the earlier tasks at the end of the sequence.

    With `acc[k][j]` the accuracy of task `j`'s classes after training task `k` (`j <= k`) and `K` the last
    task, forgetting = (1 / K) sum_{j=0}^{K-1} (acc[j][j] - acc[K][j]): the drop of each earlier task from just
    after it was learned to the end. The last task is excluded (it cannot have been forgotten yet), one task
    gives 0.0, an empty matrix raises. Negative values mean earlier tasks improved (backward transfer); entries
    with `j > k` (e.g. NaN padding of a square array) are ignored.

    Example:
        >>> forgetting([[1.0], [0.8, 0.9], [0.6, 0.9, 0.95]])  # ((1.0 - 0.6) + (0.9 - 0.9)) / 2
        0.2
    """
    if len(acc_matrix) == 0:
        raise ValueError("forgetting needs at least one row of the accuracy matrix, got none.")
    _check_accuracy_matrix(acc_matrix)
    last = len(acc_matrix) - 1
    if last == 0:
        return 0.0
    return sum(float(acc_matrix[j][j]) - float(acc_matrix[last][j]) for j in range(last)) / last


@dataclass
class AccuracyMatrix:
    """Lower-triangular accuracy matrix of a task sequence: `rows[k][j]` = accuracy of task `j` after task `k`.

    Example:
        >>> matrix = AccuracyMatrix()
        >>> matrix.append([1.0])
        >>> matrix.append({0: 0.8, 1: 0.9})
        >>> matrix.forgetting(), matrix.average_accuracy()
        (0.2..., 0.85)
    """

    rows: list[list[float]] = field(default_factory=list, metadata={"help": "Row k holds tasks 0..k."})

    def append(self, accuracies: Mapping[int, float] | Sequence[float]) -> None:
        """Add the row of the next task `k`: accuracies of tasks `0..k`, as a list or as `{task: accuracy}`."""
        k = len(self.rows)
        if isinstance(accuracies, Mapping):
            if sorted(accuracies) != list(range(k + 1)):
                raise ValueError(
                    f"Row {k} needs the accuracy of exactly the tasks 0..{k}, got tasks {sorted(accuracies)}."
                )
            row = [float(accuracies[j]) for j in range(k + 1)]
        else:
            row = [float(a) for a in accuracies]
            if len(row) != k + 1:
                raise ValueError(f"Row {k} needs the accuracy of tasks 0..{k} ({k + 1} values), got {len(row)}.")
        self.rows.append(row)

    def forgetting(self) -> float:
        """See `forgetting`."""
        return forgetting(self.rows)

    def average_accuracy(self) -> float:
        """Mean accuracy over all tasks after the last one: (1 / (K + 1)) sum_j acc[K][j]."""
        if not self.rows:
            raise ValueError("The accuracy matrix is empty; append a row first.")
        return sum(self.rows[-1]) / len(self.rows[-1])

    def to_tensor(self) -> Tensor:
        """`(num_tasks, num_tasks)` float64 tensor with NaN above the diagonal."""
        n = len(self.rows)
        out = torch.full((n, n), float("nan"), dtype=torch.float64)
        for k, row in enumerate(self.rows):
            out[k, : k + 1] = torch.tensor(row, dtype=torch.float64)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------------------


class _PenultimateFeatures(nn.Module):
    """Exposes `model.features` as `forward`, with the `num_features` torchmetrics reads."""

    def __init__(self, model: nn.Module, num_features: int) -> None:
        super().__init__()
        self.model = model
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        features = self.model.features(x) if hasattr(self.model, "features") else self.model(x)
        return features.flatten(1)


@torch.no_grad()
def frechet_distance(
    feature_extractor: nn.Module, real_images: Tensor, generated_images: Tensor, *, batch_size: int = 256
) -> float:
    """Fréchet distance between real and generated images in a classifier's feature space (an FID).

    FD = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2}), with `mu`, `S` the mean and (unbiased)
    covariance of the features of each set, computed in float64 by torchmetrics' `FrechetInceptionDistance`
    with `feature_extractor` in place of Inception (no download: the default Inception network is never built).
    Values are only comparable for the same feature extractor and similar set sizes (FD is biased upwards for
    small sets).

    Args:
        feature_extractor: a module with a `features(x) -> (batch, feature_dim)` method (e.g. the real-data
            `SmallClassifier`), otherwise its `forward` must return `(batch, feature_dim)` features.
        real_images: `(num_real, channels, height, width)` real images in [-1, 1], at least 2.
        generated_images: `(num_generated, channels, height, width)` generated images in [-1, 1], at least 2.
        batch_size: images per forward pass.

    Example:
        >>> real_classifier = train_classifier(train_x, train_y, num_classes=10)
        >>> frechet_distance(real_classifier, test_x, generated_images)
    """
    for name, images in (("real_images", real_images), ("generated_images", generated_images)):
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] < 2:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"`{name}` must be a tensor of shape (batch, channels, height, width) with batch >= 2 to estimate "
                f"a covariance, got {shape}."
            )
    was_training = feature_extractor.training
    feature_extractor.eval()
    device = _module_device(feature_extractor)
    num_features = getattr(feature_extractor, "num_features", None)
    if not isinstance(num_features, int):
        num_features = _PenultimateFeatures(feature_extractor, 0)(to_model_range(real_images[:2].to(device))).shape[1]
    # torchmetrics takes a second to import: only the FD needs it.
    from torchmetrics.image.fid import FrechetInceptionDistance

    # The caller passes all the images it wants compared: never gather states from other processes (under
    # torch.distributed only the main process evaluates, and a gather would wait for the others forever).
    metric = FrechetInceptionDistance(
        feature=_PenultimateFeatures(feature_extractor, num_features), sync_on_compute=False, dist_sync_on_step=False
    )
    # torchmetrics keeps feature sums in float64; states follow the feature extractor's device.
    metric = metric.to(device)
    try:
        for images, real in ((real_images, True), (generated_images, False)):
            for start in range(0, images.shape[0], batch_size):
                metric.update(to_model_range(images[start : start + batch_size].to(device)), real=real)
        value = metric.compute().item()
    finally:
        feature_extractor.train(was_training)
    # Identical sets give a tiny negative value from round-off in the eigenvalues of S_r S_g.
    return max(value, 0.0)


def tensor_sha256(tensor: Tensor) -> str:
    """sha256 of a tensor's bytes (contiguous, on CPU): equal digests mean bit-identical tensors."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# The records of a run: one row per task, and the run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TaskMetrics:
    """The evaluation after task `task` (tasks 0..task seen): one row of a run's `metrics.json`.

    Accuracies are fractions. Training facts (steps, seconds, parameters) are None when the row was not produced by a
    training run.
    """

    task: int = field(metadata={"help": "Index k of the last task trained."})
    class_ids: list[int] = field(metadata={"help": "The classes of task k."})
    seen_class_ids: list[int] = field(metadata={"help": "All classes of tasks 0..k, in task order."})
    cas: float = field(metadata={"help": "CAS over all classes seen so far."})
    cas_per_task: list[float] = field(metadata={"help": "CAS test accuracy of each task j <= k's classes."})
    recognition: float = field(metadata={"help": "Recognition accuracy of all generated samples."})
    accuracy_per_task: list[float] = field(metadata={"help": "Recognition accuracy of each task j <= k: a row."})
    cas_per_class: dict[str, float] = field(
        default_factory=dict, metadata={"help": "CAS test accuracy of each seen class, keyed by class id."}
    )
    recognition_per_class: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Recognition accuracy of each seen class, keyed by class id."}
    )
    fd: float | None = field(default=None, metadata={"help": "Frechet distance of all seen classes."})
    fd_per_task: list[float] | None = field(default=None, metadata={"help": "FD restricted to each task j <= k."})
    real_data_accuracy_seen: float | None = field(
        default=None, metadata={"help": "The real-data classifier's accuracy on the seen classes' test images."}
    )
    samples_sha256: dict[str, str] = field(
        default_factory=dict, metadata={"help": "sha256 of each class's evaluation samples, keyed by class id."}
    )
    old_samples_identical: bool | None = field(
        default=None, metadata={"help": "Every earlier class's samples are bit-identical to the previous row's."}
    )
    train_steps: int | None = field(default=None, metadata={"help": "Optimisation steps of task k."})
    train_seconds: float | None = field(default=None, metadata={"help": "Training time of task k."})
    eval_seconds: float | None = field(default=None, metadata={"help": "Saving and evaluation time after task k."})
    final_loss: float | None = field(default=None, metadata={"help": "Loss of the last training step."})
    trainable_parameters: int | None = field(default=None, metadata={"help": "Parameters task k trained."})
    extra_parameters_per_class: int | None = field(
        default=None, metadata={"help": "Adapter parameters per class of task k."}
    )

    @classmethod
    def from_dict(cls, data: Mapping) -> TaskMetrics:
        """The row stored as `data` (unknown keys are ignored, missing optional ones are None)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a metrics row must be a JSON object, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ContinualMetrics:
    """The evaluation of a continual run after each of its tasks: what a run folder stores as `metrics.json`.

    `add` appends (or replaces) the row of a task; the accuracy matrix (`rows[k][j]` = recognition accuracy of task
    j after task k), `forgetting` and `average_cas` follow from the rows.

    Example:
        >>> metrics = ContinualMetrics(dataset="digits", task_layout=[[0, 1], [2, 3]], real_data_accuracy=0.99)
        >>> metrics.add(row_after_task_0)
        >>> metrics.add(row_after_task_1)
        >>> metrics.forgetting, metrics.average_cas
    """

    dataset: str | None = None
    function: str | None = None
    num_functions: int | None = None
    task_layout: list[list[int]] = field(default_factory=list)
    real_data_accuracy: float | None = None
    tasks: list[TaskMetrics] = field(default_factory=list)

    def add(self, row: TaskMetrics) -> None:
        """Set the row of task `row.task` (dropping any later rows) and mark whether old samples stayed identical."""
        if not 0 <= row.task <= len(self.tasks):
            raise ValueError(
                f"the row of task {row.task} cannot follow the rows of tasks 0..{len(self.tasks) - 1}; add the rows "
                "in task order."
            )
        previous = self.tasks[row.task - 1].samples_sha256 if row.task > 0 else {}
        if row.old_samples_identical is None and previous:
            row.old_samples_identical = all(row.samples_sha256.get(c) == digest for c, digest in previous.items())
        self.tasks = self.tasks[: row.task] + [row]

    @property
    def accuracy_matrix(self) -> AccuracyMatrix:
        matrix = AccuracyMatrix()
        for row in self.tasks:
            matrix.append(row.accuracy_per_task)
        return matrix

    @property
    def forgetting(self) -> float | None:
        """`forgetting` of the recognition accuracy matrix; None before the first row."""
        return self.accuracy_matrix.forgetting() if self.tasks else None

    @property
    def average_cas(self) -> float | None:
        """Mean of the CAS after each task (the average incremental CAS); None before the first row."""
        return sum(row.cas for row in self.tasks) / len(self.tasks) if self.tasks else None

    @property
    def old_samples_identical(self) -> bool | None:
        """Whether every earlier class's samples stayed bit-identical after every task; None with one row."""
        marks = [row.old_samples_identical for row in self.tasks[1:]]
        return None if not marks or None in marks else all(marks)

    def to_dict(self) -> dict:
        """The JSON object of `metrics.json` (the rows, then the accuracy matrix, forgetting and average CAS)."""
        data = asdict(self)
        data.update(
            accuracy_matrix=self.accuracy_matrix.rows, forgetting=self.forgetting, average_cas=self.average_cas
        )
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> ContinualMetrics:
        """The record stored as `data`; the derived entries are recomputed from the rows."""
        if not isinstance(data, Mapping):
            raise TypeError(f"metrics must be a JSON object, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)} - {"tasks"}
        metrics = cls(**{k: v for k, v in data.items() if k in known})
        rows = data.get("tasks") or []
        if not isinstance(rows, list):
            raise TypeError(f"'tasks' must be a list of rows, got {type(rows).__name__}.")
        metrics.tasks = [TaskMetrics.from_dict(row) for row in rows]
        return metrics


# ----------------------------------------------------------------------------------------------------------------
# Sampling and one evaluation stage
# ----------------------------------------------------------------------------------------------------------------


def class_seed(seed: int, class_id: int) -> int:
    """Seed of the generator of class `class_id`: `seed * 100003 + class_id`."""
    return seed * _CLASS_SEED_STRIDE + int(class_id)


def generate_per_class(
    sample_fn: SampleFn,
    class_ids: Sequence[int],
    samples_per_class: int,
    *,
    seed: int,
    batch_size: int | None = None,
    generator_device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """Draw `samples_per_class` images of every class, each class with its own seeded generator.

    Class `c` is sampled with `torch.Generator(generator_device).manual_seed(seed * 100003 + c)` in batches that
    contain only class `c`, so its samples depend only on `(sample_fn, seed, c, samples_per_class, batch_size)`:
    they are identical whether `c` is generated alone or with other classes, in any order, which makes the
    evaluation of an old class comparable across tasks.

    Args:
        sample_fn: `sample_fn(class_label, num_samples, generator) -> (num_samples, channels, height, width)`.
        class_ids: classes to sample, in output order.
        samples_per_class: images per class.
        seed: evaluation seed.
        batch_size: at most this many images per `sample_fn` call (None: one call per class); drawing a class in
            several calls consumes its generator in chunks, so changing it changes the samples.
        generator_device: device of the generators (a CPU generator keeps samples identical across devices
            when `sample_fn` draws its noise on CPU).

    Returns:
        `images` of shape `(len(class_ids) * samples_per_class, channels, height, width)` and `labels` of shape
        `(len(class_ids) * samples_per_class,)`, grouped by class in the order of `class_ids`.

    Example:
        >>> def sample_fn(class_label, num_samples, generator):
        ...     noise = torch.randn(num_samples, 1, 16, 16, generator=generator)
        ...     return pipeline_sample(noise, class_label)  # any generator
        >>> images, labels = generate_per_class(sample_fn, class_ids=[0, 1, 2], samples_per_class=100, seed=0)
    """
    class_ids = [int(c) for c in class_ids]
    if len(set(class_ids)) != len(class_ids):
        raise ValueError(f"`class_ids` must not repeat a class, got {class_ids}.")
    if samples_per_class < 1:
        raise ValueError(f"`samples_per_class` must be at least 1, got {samples_per_class}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1 or None, got {batch_size}.")
    chunk = samples_per_class if batch_size is None else batch_size
    all_images, all_labels = [], []
    for class_id in class_ids:
        generator = torch.Generator(device=generator_device).manual_seed(class_seed(seed, class_id))
        remaining = samples_per_class
        while remaining > 0:
            n = min(chunk, remaining)
            images = sample_fn(class_id, n, generator)
            if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] != n:
                shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
                raise ValueError(
                    f"sample_fn({class_id}, {n}, generator) must return a tensor of shape ({n}, channels, height, "
                    f"width), got {shape}."
                )
            all_images.append(images)
            all_labels.append(torch.full((n,), class_id, dtype=torch.long, device=images.device))
            remaining -= n
    if not all_images:
        raise ValueError("`class_ids` is empty; pass at least one class to sample.")
    return torch.cat(all_images), torch.cat(all_labels)


def evaluate_stage(
    classifier: nn.Module,
    test_images: Tensor,
    test_labels: Tensor,
    tasks: Sequence[Sequence[int]],
    generated_images: Tensor,
    generated_labels: Tensor,
    *,
    num_classes: int,
    compute_fd: bool = True,
    seed: int = 0,
    **cas_kwargs: Any,
) -> TaskMetrics:
    """Evaluate the generator after task `k = len(tasks) - 1` from its samples of the classes of tasks 0..k.

    Computes CAS (a fresh classifier trained on the generated samples, tested on the real test images of the
    seen classes), the recognition accuracy of the fixed real-data `classifier` on the generated samples
    (overall and per task, i.e. row `k` of an `AccuracyMatrix`) and, with `compute_fd`, the Fréchet distance
    to the real test images of the seen classes in `classifier`'s feature space (overall and per task).

    Args:
        classifier: the FIXED classifier trained once on all real training data (`train_classifier`).
        test_images, test_labels: the REAL held-out test set (classes beyond tasks 0..k are ignored).
        tasks: class ids of each task up to the current one, e.g. `[[0, 1], [2, 3]]` after task 1.
        generated_images, generated_labels: samples of the classes of `tasks` (`generate_per_class`).
        num_classes: size of the full label space.
        compute_fd: whether to compute the Fréchet distances.
        seed: seed of the CAS classifier.
        cas_kwargs: epochs, steps, batch_size, lr, augment, device of `classification_accuracy_score`.

    Example:
        >>> matrix = AccuracyMatrix()
        >>> for k in range(len(all_tasks)):
        ...     # ... train task k ...
        ...     seen = [c for task in all_tasks[: k + 1] for c in task]
        ...     images, labels = generate_per_class(sample_fn, seen, samples_per_class=200, seed=0)
        ...     stage = evaluate_stage(real_classifier, test_x, test_y, all_tasks[: k + 1], images, labels,
        ...                            num_classes=10)
        ...     matrix.append(stage.accuracy_per_task)
        >>> matrix.forgetting()
    """
    if len(tasks) == 0:
        raise ValueError("`tasks` is empty; pass the class ids of tasks 0..k.")
    class_ids = [int(c) for task in tasks for c in task]
    if len(set(class_ids)) != len(class_ids):
        raise ValueError(f"A class appears in more than one task: {[list(t) for t in tasks]}.")
    _check_images_labels(generated_images, generated_labels, num_classes, what="generated")
    gen_x, gen_y = _select_classes(generated_images, generated_labels, class_ids)
    missing = sorted(set(class_ids) - set(gen_y.unique().tolist()))
    if missing:
        raise ValueError(f"No generated samples of classes {missing}; sample every class of `tasks`.")

    cas = classification_accuracy_score(
        gen_x, gen_y, test_images, test_labels, num_classes=num_classes, class_ids=class_ids, seed=seed, **cas_kwargs
    )
    predictions = predict(classifier, gen_x)
    gen_y_cpu = gen_y.cpu().long()
    recognition = (predictions == gen_y_cpu).double().mean().item()
    recognition_per_task = _per_task_accuracy(predictions, gen_y_cpu, tasks)

    fd = fd_per_task = None
    if compute_fd:
        real_x, real_y = _select_classes(test_images, test_labels, class_ids)
        fd = frechet_distance(classifier, real_x, gen_x)
        fd_per_task = []
        for task in tasks:
            task_real, _ = _select_classes(real_x, real_y, task)
            task_gen, _ = _select_classes(gen_x, gen_y, task)
            fd_per_task.append(frechet_distance(classifier, task_real, task_gen))
    return TaskMetrics(
        task=len(tasks) - 1,
        class_ids=[int(c) for c in tasks[-1]],
        seen_class_ids=class_ids,
        cas=cas.accuracy,
        cas_per_task=cas.per_task_accuracy(tasks),
        recognition=recognition,
        accuracy_per_task=recognition_per_task,
        cas_per_class={str(c): cas.per_class_accuracy[c] for c in class_ids},
        recognition_per_class={
            str(c): value for c, value in _per_class_accuracy(predictions, gen_y_cpu, class_ids).items()
        },
        fd=fd,
        fd_per_task=fd_per_task,
        samples_sha256={str(c): tensor_sha256(gen_x[gen_y == c]) for c in class_ids},
    )


# ----------------------------------------------------------------------------------------------------------------
# Evaluating a run after each task
# ----------------------------------------------------------------------------------------------------------------


class ContinualEvaluator:
    """Scores a class-incremental generator after each task with one FIXED classifier trained on real data.

    After task k the generator's samples of every class seen so far (`samples_per_class` each, one seeded generator
    per class, `generate_per_class`) give the CAS, row k of the recognition accuracy matrix and the Frechet distance
    (`evaluate_stage`), and the columns of a sample grid.

    Args:
        data: an `ImageClassificationData` (its real train images train the fixed classifier, its real test images
            are what CAS is measured on).
        tasks: the class ids of every task of the run.
        seed: seeds the classifiers and the sampling generators.
        samples_per_class: generated samples per class for CAS, recognition and FD (at least 2).
        classifier_epochs, classifier_augment: training of the fixed classifier and of every CAS classifier.
        classifier_steps: optimisation steps of the fixed classifier instead of `classifier_epochs` epochs (on 60,000
            images a fixed budget is much cheaper).
        cas_steps_per_class: each CAS classifier trains this many steps per seen class instead of
            `classifier_epochs` epochs over the samples, so that its budget grows with the classes, not the samples.
        grid_columns: samples per class shown in the grid.
        classifier: a trained fixed classifier to use instead of training one.
        reuse_old_samples: sample only the new classes after each task and reuse the samples of the earlier ones,
            which is exact when old classes' outputs never change (FunLoRA; not a fine-tuned or replay model). A few
            fresh probe samples of every old class are still drawn and compared bit for bit with those drawn when
            the class was new: `old_samples_identical` of the row says whether they matched.

    Example:
        >>> evaluator = ContinualEvaluator(data, tasks, seed=0)
        >>> row, grid = evaluator.evaluate(pipeline_sample_fn(pipe, 10), task=0)
    """

    def __init__(
        self,
        data,
        tasks: Sequence[Sequence[int]],
        *,
        seed: int = 0,
        samples_per_class: int = 100,
        classifier_epochs: int = 15,
        classifier_augment: bool = True,
        classifier_steps: int | None = None,
        cas_steps_per_class: int | None = None,
        grid_columns: int = 10,
        classifier: nn.Module | None = None,
        reuse_old_samples: bool = False,
    ) -> None:
        if samples_per_class < 2:
            raise ValueError(
                f"samples_per_class={samples_per_class} must be >= 2: the Frechet distance needs a covariance."
            )
        self.data, self.tasks, self.seed = data, [list(task) for task in tasks], seed
        self.samples_per_class, self.grid_columns = samples_per_class, grid_columns
        self.classifier_epochs, self.classifier_augment = classifier_epochs, classifier_augment
        self.cas_steps_per_class, self.reuse_old_samples = cas_steps_per_class, reuse_old_samples
        self._samples: dict[int, Tensor] = {}  # class id -> its evaluation samples (reuse_old_samples)
        self._probes: dict[int, str] = {}  # class id -> sha256 of its probe samples when it was first evaluated
        self.num_classes = len(data.class_names)
        started = time.perf_counter()
        if classifier is None:
            classifier = train_classifier(
                data.train_images,
                data.train_labels,
                num_classes=self.num_classes,
                epochs=classifier_epochs,
                steps=classifier_steps,
                seed=seed,
                augment=classifier_augment,
            )
        self.classifier = classifier.eval()
        self.classifier_seconds = time.perf_counter() - started
        # When the layout covers every class this is `real_data_accuracy` with the same settings: the same seeded
        # classifier trained on the same images, tested on the same real test images.
        self.real_data_accuracy = self.real_accuracy([c for task in self.tasks for c in task])

    def real_accuracy(self, class_ids: Sequence[int]) -> float:
        """The fixed classifier's accuracy on the real test images of `class_ids` (argmax over those classes)."""
        class_ids = list(class_ids)
        keep = torch.isin(self.data.test_labels, torch.tensor(class_ids))
        predictions = predict(self.classifier, self.data.test_images[keep], class_ids=class_ids)
        return (predictions == self.data.test_labels[keep]).double().mean().item()

    def evaluate(self, sample_fn: SampleFn, task: int) -> tuple[TaskMetrics, Tensor]:
        """The metrics after task `task` and the sample grid.

        Returns:
            The `TaskMetrics` row and the grid images `(seen classes * grid_columns, channels, height, width)` in
            [0, 1], one class after the other.
        """
        started = time.perf_counter()
        seen_tasks = self.tasks[: task + 1]
        seen = [c for t in seen_tasks for c in t]
        images, labels, old_identical = self._samples_of(sample_fn, seen)
        row = evaluate_stage(
            self.classifier,
            self.data.test_images,
            self.data.test_labels,
            seen_tasks,
            images,
            labels,
            num_classes=self.num_classes,
            seed=self.seed,
            epochs=self.classifier_epochs,
            steps=self.cas_steps_per_class * len(seen) if self.cas_steps_per_class else None,
            augment=self.classifier_augment,
        )
        row.old_samples_identical = old_identical
        row.real_data_accuracy_seen = self.real_accuracy(seen)
        row.eval_seconds = time.perf_counter() - started
        columns = min(self.grid_columns, self.samples_per_class)
        grid = torch.cat([images[labels == c][:columns] for c in seen])
        return row, (grid + 1) / 2

    def _samples_of(self, sample_fn: SampleFn, seen: list[int]) -> tuple[Tensor, Tensor, bool | None]:
        """The evaluation samples of `seen` (on the CPU) and, with `reuse_old_samples`, whether the probes matched."""
        if not self.reuse_old_samples:
            images, labels = generate_per_class(sample_fn, seen, self.samples_per_class, seed=self.seed)
            return images.cpu(), labels.cpu(), None
        new = [c for c in seen if c not in self._samples]
        if new:
            images, labels = generate_per_class(sample_fn, new, self.samples_per_class, seed=self.seed)
            images, labels = images.cpu(), labels.cpu()
            self._samples.update({c: images[labels == c] for c in new})
        old = [c for c in seen if c in self._probes]
        identical = None
        probe, probe_labels = generate_per_class(sample_fn, seen, _PROBE_SAMPLES, seed=self.seed + _PROBE_SEED)
        digests = {c: tensor_sha256(probe[probe_labels == c].cpu()) for c in seen}
        if old:
            identical = all(self._probes[c] == digests[c] for c in old)
        for c in seen:
            self._probes.setdefault(c, digests[c])
        images = torch.cat([self._samples[c] for c in seen])
        labels = torch.cat([torch.full((len(self._samples[c]),), c, dtype=torch.long) for c in seen])
        return images, labels, identical
