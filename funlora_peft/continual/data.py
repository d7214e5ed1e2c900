"""Image-classification data for class-incremental generation (method.md §1).

`load_image_classification_data` loads a whole labelled image dataset into memory as tensors of shape
`(num_images, channels, resolution, resolution)` in [-1, 1] (the range the flow's data end `x_1` lives in), with int64
global class ids. Sources: the embedded scikit-learn `digits` (no download, the default), a local directory of
MNIST-format IDX files (e.g. Fashion-MNIST), any Hugging Face Hub dataset, or a local `imagefolder` directory (one
sub-folder per class). `funlora_peft.continual.tasks` cuts the classes into tasks.

`datasets` and `scikit-learn` are imported inside the loaders: they take seconds to import and most users of
the package (adapters, sampling) never touch them.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "DIGITS_DATASET_NAME",
    "FASHION_MNIST_CLASS_NAMES",
    "FASHION_MNIST_DIRECTORY",
    "ImageClassificationData",
    "is_idx_directory",
    "load_image_classification_data",
    "read_idx",
    "to_model_range",
]

DIGITS_DATASET_NAME = "digits"
# scikit-learn's digits are 8x8 with integer intensities 0..16.
_DIGITS_RESOLUTION = 8
_DIGITS_MAX_VALUE = 16.0
# PIL modes holding a single intensity channel; everything else (RGB, RGBA, P, CMYK, ...) is treated as colour.
_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass
class ImageClassificationData:
    """A labelled image dataset held in memory, split into train and test.

    Attributes:
        train_images: `(num_train, num_channels, resolution, resolution)`: uint8 in 0..255 for 8-bit sources (IDX
            files, image files, Hub datasets; a quarter of float32's memory), float32 in [-1, 1] for the digits.
            `to_model_range` turns a batch of either into what the models see, float32 in [-1, 1].
        train_labels: `(num_train,)` int64 global class ids.
        test_images: `(num_test, num_channels, resolution, resolution)`, stored as `train_images` (the real
            held-out images the Classification Accuracy Score is measured on, method.md §5).
        test_labels: `(num_test,)` int64 global class ids.
        class_names: `class_names[i]` is the name of class id `i`.
        num_channels: 1 (grayscale) or 3 (RGB).
        resolution: height and width of every image.
        name: the dataset name or local path it was loaded from.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    num_channels: int
    resolution: int
    name: str

    @property
    def class_ids(self) -> list[int]:
        """Sorted ids of the classes present in the train split."""
        return sorted(torch.unique(self.train_labels).tolist())

    @property
    def num_classes(self) -> int:
        """Number of classes present in the train split."""
        return len(self.class_ids)

    @property
    def nbytes(self) -> int:
        """Bytes held by the image and label tensors."""
        tensors = (self.train_images, self.train_labels, self.test_images, self.test_labels)
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """A batch of stored images as the models see them: float32 in [-1, 1].

    uint8 images (how `ImageClassificationData` holds 8-bit sources) become `v / 127.5 - 1`, the values a float32
    copy of the dataset held; floating images are returned as float32.

    Example:
        >>> to_model_range(torch.tensor([0, 255], dtype=torch.uint8))
        tensor([-1.,  1.])
    """
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1
    return images.float()


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def load_image_classification_data(
    dataset_name: str | os.PathLike | None = None,
    *,
    resolution: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
    train_split: str = "train",
    test_split: str | None = "test",
    num_channels: int | None = None,
    center_crop: bool = True,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> ImageClassificationData:
    """Load a labelled image dataset into memory: `(N, C, resolution, resolution)` images and their labels.

    `dataset_name` picks the source:

    - `None` or `"digits"`: scikit-learn's `load_digits` (1,797 real 8x8 handwritten digits, 10 classes named
      "0".."9", no download), 1 channel, intensities `v` in 0..16 mapped to `v / 8 - 1`, resized with bilinear
      `torch.nn.functional.interpolate` (antialiased when shrinking). It has no test split: a fixed per-class one
      is carved off (see `test_fraction`).
    - an existing local directory: `datasets.load_dataset("imagefolder", data_dir=...)`, one sub-folder per
      class (class names are the folder names), optionally `train/` and `test/` above them.
    - anything else: a Hugging Face Hub dataset, e.g. `"uoft-cs/cifar100"` with `image_column="img"` and
      `label_column="fine_label"`. Class names come from the label column's `ClassLabel` feature when it has
      one, else from the label values.

    Images from `datasets` are converted to grayscale or RGB, center-cropped to their largest square (or, with
    `center_crop=False`, plainly resized, which changes the aspect ratio), resized to `resolution` with PIL's
    bilinear filter (antialiased when shrinking) and kept as uint8; `to_model_range` maps a batch from 0..255 to
    [-1, 1] as `v / 127.5 - 1`.

    Args:
        dataset_name: `"digits"` (default), a local imagefolder directory, or a Hub dataset name.
        resolution: output height and width. `None` keeps the native size: 8 for digits, else the shorter side
            of the first training image.
        image_column: column holding the images (ignored for digits).
        label_column: column holding the class labels (ignored for digits).
        train_split: name of the training split.
        test_split: name of the held-out split. When it is `None` or the dataset lacks it, a seeded per-class
            test split is carved off the training split instead.
        num_channels: 1 (grayscale) or 3 (RGB). `None` keeps 1 channel when every image is grayscale, else 3.
        center_crop: center-crop to a square before resizing (`True`) or resize directly (`False`).
        test_fraction: fraction of each class held out when a test split has to be carved off the train split.
        split_seed: seed of that carved split; the default keeps it fixed from run to run.
        cache_dir: `datasets` cache directory (default: the `datasets` default).

    Returns:
        `ImageClassificationData` with int64 global class ids as labels.

    Example:
        ```py
        >>> from funlora_peft.continual.data import load_image_classification_data
        >>> data = load_image_classification_data("digits", resolution=16)
        >>> data.train_images.shape, data.num_classes
        (torch.Size([1438, 1, 16, 16]), 10)
        ```
    """
    # Argument checks first: nothing is downloaded or decoded for a call that is going to fail anyway.
    if resolution is not None:
        _check_int("resolution", resolution, minimum=1, remedy="pass the image side in pixels, e.g. 32")
    if num_channels is not None and (isinstance(num_channels, bool) or num_channels not in (1, 3)):
        raise ValueError(
            f"num_channels must be 1 (grayscale), 3 (RGB) or None (keep 1 for grayscale datasets, 3 for colour), "
            f"got num_channels={num_channels!r}."
        )
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(
            f"test_fraction must be a number strictly between 0 and 1 (the share of each class held out for "
            f"testing), got test_fraction={test_fraction!r}; 0.2 is a common choice."
        )
    _check_int("split_seed", split_seed, minimum=0, remedy="pass an integer seed, e.g. 0")
    for argument, value in (("image_column", image_column), ("label_column", label_column)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{argument} must be a non-empty column name, got {argument}={value!r}.")
    if not isinstance(train_split, str) or not train_split:
        raise TypeError(f"train_split must be a non-empty split name, e.g. 'train', got train_split={train_split!r}.")
    if test_split is not None and (not isinstance(test_split, str) or not test_split):
        raise TypeError(f"test_split must be a split name (e.g. 'test') or None, got test_split={test_split!r}.")

    if dataset_name is None or dataset_name == DIGITS_DATASET_NAME:
        return _load_digits(resolution, num_channels, test_fraction, split_seed)
    if not isinstance(dataset_name, (str, os.PathLike)):
        raise TypeError(
            f"dataset_name must be a Hub dataset name, a local directory or None, got "
            f"dataset_name={dataset_name!r} of type {type(dataset_name).__name__}."
        )
    if is_idx_directory(dataset_name):
        return _load_idx(os.fspath(dataset_name), resolution, num_channels)
    return _load_with_datasets(
        os.fspath(dataset_name),
        resolution=resolution,
        image_column=image_column,
        label_column=label_column,
        train_split=train_split,
        test_split=test_split,
        num_channels=num_channels,
        center_crop=center_crop,
        test_fraction=test_fraction,
        split_seed=split_seed,
        cache_dir=cache_dir,
    )


def _load_digits(
    resolution: int | None, num_channels: int | None, test_fraction: float, split_seed: int
) -> ImageClassificationData:
    """scikit-learn's 8x8 digits, scaled to [-1, 1], resized and split per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # v in 0..16 -> v / 8 - 1 is exact in float32, so at the native 8x8 the tensors are the closed form.
    images = torch.from_numpy(digits.images.astype(np.float32)) / (_DIGITS_MAX_VALUE / 2) - 1
    images = images.unsqueeze(1)  # (1797, 1, 8, 8)
    resolution = _DIGITS_RESOLUTION if resolution is None else resolution
    if resolution != _DIGITS_RESOLUTION:
        # Antialiasing only matters when shrinking; bilinear upsampling stays within [-1, 1].
        images = F.interpolate(
            images,
            size=(resolution, resolution),
            mode="bilinear",
            align_corners=False,
            antialias=resolution < _DIGITS_RESOLUTION,
        ).clamp_(-1, 1)
    if num_channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_index, test_index = _per_class_split(labels.numpy(), test_fraction, split_seed, DIGITS_DATASET_NAME)
    return ImageClassificationData(
        train_images=images[train_index],
        train_labels=labels[train_index],
        test_images=images[test_index],
        test_labels=labels[test_index],
        class_names=[str(name) for name in digits.target_names],
        num_channels=images.shape[1],
        resolution=resolution,
        name=DIGITS_DATASET_NAME,
    )


# ---------------------------------------------------------------------------------------------------------------------
# MNIST-format IDX files
# ---------------------------------------------------------------------------------------------------------------------

# The files of an MNIST-format directory, by split; each may be gzip-compressed (`.gz`).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Magic numbers of the two kinds of files: unsigned bytes (0x08) in 3 dimensions (images) or 1 (labels).
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}
# Where Debian's dataset-fashion-mnist package installs the original IDX files.
FASHION_MNIST_DIRECTORY = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# sha256 of the 60,000 training labels (the bytes after the header) of the known IDX datasets, to name their classes.
_KNOWN_IDX_LABELS = {
    "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7": FASHION_MNIST_CLASS_NAMES,
}


def _idx_path(directory: str | os.PathLike, name: str) -> str | None:
    """The path of IDX file `name` in `directory`, plain or gzip-compressed; None when neither exists."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(os.path.expanduser(os.fspath(directory)), candidate)
        if os.path.isfile(path):
            return path
    return None


def is_idx_directory(directory: str | os.PathLike) -> bool:
    """Whether `directory` is a local directory holding MNIST-format training images (`train-images-idx3-ubyte`)."""
    directory = os.path.expanduser(os.fspath(directory))
    return os.path.isdir(directory) and _idx_path(directory, IDX_FILES["train"][0]) is not None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one MNIST-format IDX file of unsigned bytes (plain or `.gz`) as a uint8 array.

    The format: a 4-byte big-endian magic number `0x00000803` (images, 3 dimensions) or `0x00000801` (labels, 1
    dimension), then one 4-byte big-endian size per dimension, then the bytes in C order.

    Returns:
        `(count, rows, columns)` for an image file, `(count,)` for a label file.
    """
    import gzip

    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path} could not be read ({type(error).__name__}: {error}); download it again.") from None
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    dims = {value: ndim for ndim, value in _IDX_MAGIC.items()}.get(magic)
    if dims is None:
        shown = "none (the file is shorter than 4 bytes)" if magic is None else f"0x{magic:08x}"
        raise ValueError(
            f"{path} is not an MNIST-format IDX file of unsigned bytes: its magic number is {shown}, expected "
            f"0x{_IDX_MAGIC[3]:08x} (images) or 0x{_IDX_MAGIC[1]:08x} (labels)."
        )
    header = 4 + 4 * dims
    if len(data) < header:
        raise ValueError(f"{path} is truncated: its header needs {header} bytes, the file has {len(data)}.")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(
            f"{path} holds {len(data)} bytes but its header announces {shape} ({expected} bytes with the header): "
            "the file is truncated or corrupted; download it again."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _read_idx_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The `(count, rows, columns)` images and `(count,)` labels of one split of an IDX directory."""
    arrays = []
    for name, ndim in zip(IDX_FILES[split], (3, 1)):
        path = _idx_path(directory, name)
        if path is None:
            raise ValueError(
                f"dataset_name={directory!r} holds MNIST-format IDX files but lacks {name} (or {name}.gz); an IDX "
                f"directory needs {[n for pair in IDX_FILES.values() for n in pair]}."
            )
        array = read_idx(path)
        if array.ndim != ndim:
            kind = "images (3 dimensions)" if ndim == 3 else "labels (1 dimension)"
            raise ValueError(f"{path} holds a {array.ndim}-dimensional array, expected {kind}.")
        arrays.append((path, array))
    (image_path, images), (label_path, labels) = arrays
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{image_path} holds {images.shape[0]} images but {label_path} holds {labels.shape[0]} labels; the two "
            "files of a split must match."
        )
    return images, labels


def _load_idx(directory: str, resolution: int | None, num_channels: int | None) -> ImageClassificationData:
    """An MNIST-format directory (MNIST, Fashion-MNIST, ...): its own train and test (`t10k`) splits, grayscale."""
    import hashlib

    from PIL import Image

    directory = os.path.expanduser(directory)
    splits = {split: _read_idx_split(directory, split) for split in IDX_FILES}
    train_images, train_labels = splits["train"]
    rows, columns = train_images.shape[1:]
    if rows != columns:
        raise ValueError(f"{directory}: the IDX images are {rows}x{columns}; only square images are supported.")
    resolution = rows if resolution is None else resolution

    def to_tensor(images: np.ndarray) -> torch.Tensor:
        if images.shape[1:] != (resolution, resolution):
            # PIL's bilinear filter, as for every other source (antialiased when shrinking).
            size = (resolution, resolution)
            images = np.stack(
                [np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)) for image in images]
            )
        return _to_tensor(list(images), num_channels or 1)

    digest = hashlib.sha256(train_labels.tobytes()).hexdigest()
    num_labels = int(max(train_labels.max(), splits["test"][1].max())) + 1
    class_names = list(_KNOWN_IDX_LABELS.get(digest, [str(class_id) for class_id in range(num_labels)]))
    return ImageClassificationData(
        train_images=to_tensor(train_images),
        train_labels=torch.from_numpy(train_labels.astype(np.int64)),
        test_images=to_tensor(splits["test"][0]),
        test_labels=torch.from_numpy(splits["test"][1].astype(np.int64)),
        class_names=class_names,
        num_channels=num_channels or 1,
        resolution=resolution,
        name=directory,
    )


def _load_with_datasets(
    dataset_name: str,
    *,
    resolution: int | None,
    image_column: str,
    label_column: str,
    train_split: str,
    test_split: str | None,
    num_channels: int | None,
    center_crop: bool,
    test_fraction: float,
    split_seed: int,
    cache_dir: str | os.PathLike | None,
) -> ImageClassificationData:
    """A local imagefolder or a Hub dataset through a `datasets` builder."""
    import datasets

    local_dir = os.path.expanduser(dataset_name)
    if os.path.isdir(local_dir):
        path, data_dir, source = "imagefolder", local_dir, f"the local imagefolder directory {local_dir!r}"
    elif dataset_name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.isabs(dataset_name):
        raise ValueError(
            f"dataset_name={dataset_name!r} looks like a local path but is not an existing directory. Pass a "
            f"directory with one sub-folder of images per class, a Hub dataset name such as 'uoft-cs/cifar100', "
            f"or {DIGITS_DATASET_NAME!r}."
        )
    else:
        path, data_dir, source = dataset_name, None, f"the Hub dataset {dataset_name!r}"

    # The builder reads metadata only, so a wrong name or split fails here, before any download.
    try:
        builder = datasets.load_dataset_builder(path, data_dir=data_dir, cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError) as error:
        if data_dir is not None:
            raise ValueError(
                f"dataset_name={dataset_name!r} is a directory without images ({type(error).__name__}: {error}). "
                f"Put the images in one sub-folder per class (e.g. {dataset_name}/cat/1.png), optionally under "
                f"train/ and test/."
            ) from error
        raise ValueError(
            f"dataset_name={dataset_name!r} could not be found locally or on the Hugging Face Hub "
            f"({type(error).__name__}: {error}). Check the name (e.g. 'uoft-cs/cifar100'), pass the path of a local "
            f"imagefolder directory (one sub-folder of images per class), or use the embedded "
            f"{DIGITS_DATASET_NAME!r} dataset. Without network access, only datasets already in the cache load."
        ) from error
    _check_train_split(_split_names(builder), train_split, source)
    if builder.info.features is not None:
        _check_columns(builder.info.features, image_column, label_column, source)

    builder.download_and_prepare()
    split_names = _split_names(builder)
    _check_train_split(split_names, train_split, source)
    train = builder.as_dataset(split=train_split)
    _check_columns(train.features, image_column, label_column, source)
    test = None
    if test_split is not None and (split_names is None or test_split in split_names):
        test = builder.as_dataset(split=test_split)
        _check_columns(test.features, image_column, label_column, f"the {test_split!r} split of {source}")
    elif test_split not in (None, "test"):
        # A split asked for by name and missing is more likely a typo than a dataset without a test split.
        warnings.warn(
            f"{source} has no split test_split={test_split!r} (available: {sorted(split_names)}); holding out "
            f"{test_fraction:.0%} of each class of {train_split!r} for testing instead.",
            stacklevel=3,
        )
    else:
        logger.info(
            "%s has no test split %r: holding out %.0f%% of each class of %r (seed %d) instead.",
            source,
            test_split,
            100 * test_fraction,
            train_split,
            split_seed,
        )

    if isinstance(train.features[label_column], datasets.ClassLabel):
        class_names = list(train.features[label_column].names)
        train_labels = _read_class_labels(train, label_column, source, train_split)
        test_labels = None if test is None else _read_class_labels(test, label_column, source, test_split)
    else:
        # Raw labels: both splits must share one id space, so it is built over their union.
        train_labels, test_labels, class_names = _unify_raw_labels(
            train[label_column], [] if test is None else test[label_column], source, label_column
        )

    # With num_channels=None every image keeps its own kind (gray or colour) until all have been seen.
    mode = {None: None, 1: "L", 3: "RGB"}[num_channels]
    if resolution is None:
        resolution = _first_image_side(train, image_column, center_crop)
    train_pixels = _read_images(train, image_column, resolution, center_crop, mode)
    test_pixels = [] if test is None else _read_images(test, image_column, resolution, center_crop, mode)
    if num_channels is None:
        num_channels = 1 if all(array.ndim == 2 for array in train_pixels + test_pixels) else 3

    train_images = _to_tensor(train_pixels, num_channels)
    if test is None:
        train_index, test_index = _per_class_split(train_labels.numpy(), test_fraction, split_seed, source)
        test_images, test_labels = train_images[test_index], train_labels[test_index]
        train_images, train_labels = train_images[train_index], train_labels[train_index]
    else:
        test_images = _to_tensor(test_pixels, num_channels)
    return ImageClassificationData(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=class_names,
        num_channels=num_channels,
        resolution=resolution,
        name=dataset_name,
    )


def _split_names(builder) -> set[str] | None:
    """Split names a builder knows of, from its split info or its data files; `None` when it cannot tell yet."""
    if builder.info.splits:
        return {str(name) for name in builder.info.splits}
    data_files = getattr(builder.config, "data_files", None)
    if data_files:
        return {str(name) for name in data_files}
    return None


def _check_train_split(split_names: set[str] | None, train_split: str, source: str) -> None:
    """Raise when the split names are known and lack `train_split`."""
    if split_names is not None and train_split not in split_names:
        raise ValueError(
            f"{source} has no split train_split={train_split!r}; available splits: {sorted(split_names)}. "
            f"Pass one of them as train_split."
        )


def _check_columns(features, image_column: str, label_column: str, source: str) -> None:
    """Raise when the image or label column is missing or the image column does not hold images."""
    import datasets

    columns = list(features)
    image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if image_column not in features:
        raise ValueError(
            f"image_column={image_column!r} is not a column of {source}; available columns: {columns} "
            f"(image columns: {image_columns}). Pass one of them as image_column."
        )
    if label_column not in features:
        label_columns = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
        raise ValueError(
            f"label_column={label_column!r} is not a column of {source}; available columns: {columns} "
            f"(class-label columns: {label_columns}). Pass one of them as label_column."
        )
    if not isinstance(features[image_column], datasets.Image):
        raise TypeError(
            f"image_column={image_column!r} of {source} holds {features[image_column]}, not images; image "
            f"columns: {image_columns}. Pass one of them as image_column."
        )


def _read_class_labels(dataset, label_column: str, source: str, split: str) -> torch.Tensor:
    """`ClassLabel` labels of one split as int64 class ids."""
    labels = torch.tensor(list(dataset[label_column]), dtype=torch.int64)
    if (labels < 0).any():
        # Test splits of Hub competitions are often unlabelled (-1): they cannot measure accuracy.
        raise ValueError(
            f"the {split!r} split of {source} has unlabelled examples (label -1 in {label_column!r}). Pass another, "
            f"labelled split, or test_split=None to hold out part of the training split for testing."
        )
    return labels


def _unify_raw_labels(
    train_values: Iterable, test_values: Iterable, source: str, label_column: str
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Class ids for labels without a `ClassLabel` feature: integers are kept, strings numbered in sorted order."""
    train_values, test_values = list(train_values), list(test_values)
    everything = train_values + test_values
    if all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in everything):
        if min(everything) < 0:
            raise ValueError(
                f"label_column={label_column!r} of {source} holds negative labels (min {min(everything)}); class "
                f"ids must be >= 0. Pass test_split=None if an unlabelled test split is the cause."
            )
        names = [str(class_id) for class_id in range(max(everything) + 1)]
        to_id = int
    elif all(isinstance(value, str) for value in everything):
        names = sorted(set(everything))
        index = {name: class_id for class_id, name in enumerate(names)}
        to_id = index.__getitem__
    else:
        kinds = sorted({type(value).__name__ for value in everything})
        raise TypeError(
            f"label_column={label_column!r} of {source} must hold integer or string class labels, found values of "
            f"type {kinds}. Pass a class-label column as label_column."
        )
    train = torch.tensor([to_id(value) for value in train_values], dtype=torch.int64)
    test = torch.tensor([to_id(value) for value in test_values], dtype=torch.int64)
    return train, test, names


def _first_image_side(dataset, image_column: str, center_crop: bool) -> int:
    """The shorter side of the first image (its side when `center_crop=False` and it is square)."""
    if len(dataset) == 0:
        raise ValueError(f"{image_column!r} has no images: the split is empty.")
    width, height = dataset[0][image_column].size
    if not center_crop and width != height:
        raise ValueError(
            f"resolution=None keeps the native size, but the first image is {width}x{height}, not square, and "
            f"center_crop=False. Pass resolution explicitly or center_crop=True."
        )
    return min(width, height)


def _read_images(dataset, image_column: str, resolution: int, center_crop: bool, mode: str | None) -> list[np.ndarray]:
    """Decode, crop and resize every image of one split into uint8 `(H, W)` (gray) or `(H, W, 3)` (RGB) arrays.

    `mode` is "L" or "RGB"; `None` keeps each image's own kind: grayscale modes become "L", all others "RGB".
    """
    from PIL import Image

    pixels = []
    for batch in dataset.select_columns([image_column]).iter(batch_size=256):
        for image in batch[image_column]:
            image = image.convert(mode or ("L" if image.mode in _GRAYSCALE_MODES else "RGB"))
            if center_crop:
                side = min(image.size)
                left, top = (image.width - side) // 2, (image.height - side) // 2
                image = image.crop((left, top, left + side, top + side))
            if image.size != (resolution, resolution):
                # PIL's bilinear filter widens its support when shrinking, i.e. it is antialiased.
                image = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
            pixels.append(np.asarray(image))
    return pixels


def _to_tensor(pixels: list[np.ndarray], num_channels: int) -> torch.Tensor:
    """uint8 `(H, W)` / `(H, W, 3)` arrays -> uint8 `(N, num_channels, H, W)` (`to_model_range` maps a batch)."""
    if not pixels:
        raise ValueError("no images to convert: the split is empty.")
    # Repeating the gray value of an "L" image is exactly PIL's L -> RGB conversion.
    arrays = [array if array.ndim == 3 else np.repeat(array[:, :, None], num_channels, axis=2) for array in pixels]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _per_class_split(
    labels: np.ndarray, test_fraction: float, seed: int, source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class train/test split: `round(test_fraction * n_c)` of each class's `n_c` images go to test.

    Every class keeps at least one image on each side. Indices come back sorted, i.e. in dataset order.
    """
    # numpy's Generator gives the same permutation for a seed on every platform, so the split is reproducible.
    rng = np.random.default_rng(seed)
    train_index, test_index = [], []
    for class_id in np.unique(labels):
        members = np.flatnonzero(labels == class_id)
        if len(members) < 2:
            raise ValueError(
                f"class {int(class_id)} of {source} has {len(members)} image, too few to hold one out for testing. "
                f"Add images, drop the class, or provide a test split (test_split)."
            )
        members = rng.permutation(members)
        num_test = min(max(1, round(test_fraction * len(members))), len(members) - 1)
        test_index.append(members[:num_test])
        train_index.append(members[num_test:])
    return (
        torch.from_numpy(np.sort(np.concatenate(train_index))),
        torch.from_numpy(np.sort(np.concatenate(test_index))),
    )


def _check_int(argument: str, value, *, minimum: int | None, remedy: str) -> None:
    """Raise a `TypeError` for a non-integer and a `ValueError` for an integer below `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{argument} must be an integer, got {argument}={value!r}; {remedy}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{argument} must be >= {minimum}, got {argument}={value!r}; {remedy}.")
