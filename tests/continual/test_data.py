"""`funlora_peft.continual.data`: loading the digits, IDX files and image folders, and refusing bad arguments."""

import collections
import gzip
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from funlora_peft.continual import data as data_module
from funlora_peft.continual import training
from funlora_peft.continual.data import ImageClassificationData, load_image_classification_data, to_model_range

CLASSES = ("cat", "dog", "fox")
IMAGES_PER_CLASS = 3


def _pixel_value(class_id: int, index: int) -> int:
    """Intensity of a constant test image; it encodes its class so labels can be checked against pixels."""
    return 100 * class_id + 20 * index + 5


def _write_images(root, mode: str) -> None:
    """One sub-folder per class of constant 12x10 images (width 12, height 10)."""
    for class_id, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for index in range(IMAGES_PER_CLASS):
            value = _pixel_value(class_id, index)
            color = value if mode == "L" else (value, value, value)
            Image.new(mode, (12, 10), color).save(root / name / f"{index}.png")


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    _write_images(root, "RGB")
    return root


@pytest.fixture(scope="module")
def digits():
    return load_image_classification_data("digits", resolution=16)


# ---------------------------------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------------------------------


def test_digits_split_covers_every_image_and_class(digits):
    assert isinstance(digits, ImageClassificationData)
    assert len(digits.train_labels) + len(digits.test_labels) == 1797
    assert digits.class_names == [str(i) for i in range(10)]
    assert digits.class_ids == list(range(10))
    assert set(digits.test_labels.tolist()) == set(range(10))
    assert digits.train_labels.dtype == digits.test_labels.dtype == torch.int64
    # round(0.2 * n_c) of each class is held out.
    counts = collections.Counter(digits.train_labels.tolist() + digits.test_labels.tolist())
    test_counts = collections.Counter(digits.test_labels.tolist())
    assert all(test_counts[c] == round(0.2 * counts[c]) for c in range(10))


@pytest.mark.parametrize("resolution", [8, 16])
def test_digits_shape_and_range(resolution):
    data = load_image_classification_data(None, resolution=resolution)
    assert data.train_images.shape == (len(data.train_labels), 1, resolution, resolution)
    assert data.test_images.shape == (len(data.test_labels), 1, resolution, resolution)
    assert data.num_channels == 1 and data.resolution == resolution and data.name == "digits"
    for images in (data.train_images, data.test_images):
        assert images.dtype == torch.float32
        assert images.min() == -1 and images.max() == 1


def test_digits_native_resolution_is_closed_form():
    from sklearn.datasets import load_digits

    data = load_image_classification_data("digits", resolution=8)
    digits = load_digits()
    expected = digits.images.astype(np.float32) / 8 - 1
    # The split only permutes images: the multiset of (label, pixels) must be sklearn's, exactly.
    loaded = torch.cat([data.train_images, data.test_images]).squeeze(1).numpy()
    labels = torch.cat([data.train_labels, data.test_labels]).tolist()
    assert collections.Counter(zip(labels, (image.tobytes() for image in loaded))) == collections.Counter(
        zip(digits.target.tolist(), (image.tobytes() for image in expected))
    )


def test_digits_split_is_deterministic_and_seeded(digits):
    again = load_image_classification_data("digits", resolution=16)
    assert torch.equal(again.train_images, digits.train_images)
    assert torch.equal(again.test_labels, digits.test_labels)
    other = load_image_classification_data("digits", resolution=16, split_seed=1)
    assert other.test_images.shape == digits.test_images.shape
    assert not torch.equal(other.test_images, digits.test_images)


def test_digits_three_channels_repeat_the_gray_channel():
    data = load_image_classification_data("digits", resolution=8, num_channels=3)
    assert data.num_channels == 3
    assert torch.equal(data.train_images[:, 0], data.train_images[:, 2])


# ---------------------------------------------------------------------------------------------------------------------
# imagefolder (the real `datasets` path)
# ---------------------------------------------------------------------------------------------------------------------


def test_imagefolder_labels_names_and_pixels(imagefolder, tmp_path):
    data = load_image_classification_data(str(imagefolder), resolution=8, cache_dir=tmp_path)
    assert data.class_names == list(CLASSES)
    assert data.num_channels == 3
    # No test split on disk: one image of each class (round(0.2 * 3) = 1) is carved off.
    assert sorted(data.test_labels.tolist()) == [0, 1, 2]
    assert sorted(data.train_labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert data.train_images.shape == (6, 3, 8, 8)
    assert data.train_images.dtype == data.test_images.dtype == torch.uint8  # 8-bit sources are held as bytes
    # Constant images stay constant through crop + resize, at exactly their value, and match their label.
    for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        for image, label in zip(images, labels.tolist()):
            assert torch.unique(image).numel() == 1
            assert image[0, 0, 0].item() in {_pixel_value(label, index) for index in range(IMAGES_PER_CLASS)}


def test_imagefolder_grayscale_with_test_split_and_native_resolution(tmp_path):
    root = tmp_path / "gray"
    _write_images(root / "train", "L")
    _write_images(root / "test", "L")
    data = load_image_classification_data(root, cache_dir=tmp_path / "cache")
    assert data.num_channels == 1
    # The test/ folder is used as is, and resolution=None keeps the shorter side of the images.
    assert len(data.train_labels) == len(data.test_labels) == 3 * IMAGES_PER_CLASS
    assert data.resolution == 10
    assert data.test_images.shape == (9, 1, 10, 10)
    # num_channels=3 forces RGB: three equal channels.
    rgb = load_image_classification_data(root, resolution=4, num_channels=3, cache_dir=tmp_path / "cache")
    assert rgb.train_images.shape == (9, 3, 4, 4)
    assert torch.equal(rgb.train_images[:, 0], rgb.train_images[:, 1])


def test_imagefolder_center_crop(tmp_path):
    root = tmp_path / "crop"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    # 12x8, white 2-pixel borders left and right: the center crop (columns 2..9) is all black.
    array = np.zeros((8, 12), dtype=np.uint8)
    array[:, :2] = array[:, -2:] = 255
    for folder in ("a", "b"):
        for index in range(2):
            Image.fromarray(array, mode="L").save(root / folder / f"{index}.png")
    cropped = load_image_classification_data(root, resolution=8, cache_dir=tmp_path / "cache")
    assert torch.all(cropped.train_images == 0)
    squeezed = load_image_classification_data(root, resolution=8, center_crop=False, cache_dir=tmp_path / "cache")
    assert squeezed.train_images.max() > 0


def test_imagefolder_string_label_column_from_metadata(tmp_path):
    # A label column without a ClassLabel feature (as on many Hub datasets): strings are numbered in sorted order.
    root = tmp_path / "meta"
    root.mkdir()
    species = ["zebra", "ant", "moth"] * 2
    lines = ["file_name,species"]
    for index, name in enumerate(species):
        Image.new("L", (6, 6), 40 * index).save(root / f"{index}.png")
        lines.append(f"{index}.png,{name}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    data = load_image_classification_data(root, label_column="species", cache_dir=tmp_path / "cache")
    assert data.class_names == ["ant", "moth", "zebra"]
    labels = torch.cat([data.train_labels, data.test_labels])
    images = torch.cat([data.train_images, data.test_images])
    # Image `index` has intensity 40 * index and species[index]: pixels and labels stay paired.
    for image, label in zip(images, labels.tolist()):
        index = image[0, 0, 0].item() // 40
        assert data.class_names[label] == species[index]


def test_unknown_columns_list_the_available_ones(imagefolder, tmp_path):
    with pytest.raises(ValueError, match=r"label_column='fine_label'.*available columns: \['image', 'label'\]"):
        load_image_classification_data(imagefolder, label_column="fine_label", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"image_column='img'.*available columns: \['image', 'label'\]"):
        load_image_classification_data(imagefolder, image_column="img", cache_dir=tmp_path)
    with pytest.raises(TypeError, match=r"image_column='label'.*not images; image columns: \['image'\]"):
        load_image_classification_data(imagefolder, image_column="label", cache_dir=tmp_path)


def test_unknown_train_split(imagefolder, tmp_path):
    with pytest.raises(ValueError, match=r"train_split='training'; available splits: \['train'\]"):
        load_image_classification_data(imagefolder, train_split="training", cache_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"no split test_split='validation' \(available: \['train'\]\); holding out"):
        data = load_image_classification_data(imagefolder, test_split="validation", cache_dir=tmp_path)
    assert len(data.test_labels) == len(CLASSES)


def test_unknown_dataset_name_is_a_clear_error(tmp_path):
    # conftest.py sets HF_HUB_OFFLINE=1, so `datasets` fails fast with its own ConnectionError.
    with pytest.raises(
        ValueError,
        match=r"'funlora-test/no-such-dataset' could not be found locally or on the Hugging Face Hub.*imagefolder",
    ):
        load_image_classification_data("funlora-test/no-such-dataset", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="looks like a local path but is not an existing directory"):
        load_image_classification_data(str(tmp_path / "missing"), cache_dir=tmp_path)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(resolution=0), ValueError, "resolution must be >= 1, got resolution=0"),
        (dict(resolution=8.0), TypeError, "resolution must be an integer"),
        (dict(num_channels=2), ValueError, "num_channels must be 1 .* got num_channels=2"),
        (dict(test_fraction=1.0), ValueError, "test_fraction must be a number strictly between 0 and 1"),
        (dict(dataset_name=3), TypeError, "dataset_name must be"),
    ],
)
def test_bad_loader_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        load_image_classification_data(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Task layout
# ---------------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------------
# MNIST-format IDX directories (Fashion-MNIST's Debian package)
# ---------------------------------------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x0000080<ndim>, one big-endian size per dimension, the bytes."""
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_directory(root, compress: bool, per_class: int = 3, classes: int = 4, side: int = 6):
    """Tiny train and t10k splits whose image i of class c is constant 10 * c + i: pixels encode labels."""
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", per_class), ("t10k", 2)):
        labels = np.repeat(np.arange(classes), count).astype(np.uint8)
        images = np.stack([np.full((side, side), 10 * c + i) for c in range(classes) for i in range(count)])
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte"
            data = _idx_bytes(array)
            if compress:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_idx_directory_loads_its_own_splits(tmp_path, compress):
    root = _write_idx_directory(tmp_path / "idx", compress)
    data = load_image_classification_data(root)
    assert data.resolution == 6 and data.num_channels == 1 and data.class_names == ["0", "1", "2", "3"]
    assert data.train_images.shape == (12, 1, 6, 6) and data.test_images.shape == (8, 1, 6, 6)
    assert data.train_images.dtype == torch.uint8
    for images, labels, count in ((data.train_images, data.train_labels, 3), (data.test_images, data.test_labels, 2)):
        assert labels.tolist() == [c for c in range(4) for _ in range(count)]
        assert [image.unique().item() for image in images] == [10 * c + i for c in range(4) for i in range(count)]
    resized = load_image_classification_data(root, resolution=4, num_channels=3)
    assert resized.train_images.shape == (12, 3, 4, 4)
    assert torch.equal(resized.train_images[:, 0], resized.train_images[:, 2])


def test_idx_names_the_classes_of_known_datasets(tmp_path):
    root = _write_idx_directory(tmp_path / "idx", compress=False)
    labels = data_module.read_idx(root / "train-labels-idx1-ubyte")
    known = {hashlib.sha256(labels.tobytes()).hexdigest(): ("a", "b", "c", "d")}
    original = dict(data_module._KNOWN_IDX_LABELS)
    data_module._KNOWN_IDX_LABELS.update(known)
    try:
        assert load_image_classification_data(root).class_names == ["a", "b", "c", "d"]
    finally:
        data_module._KNOWN_IDX_LABELS.clear()
        data_module._KNOWN_IDX_LABELS.update(original)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda root: (root / "t10k-labels-idx1-ubyte").unlink(), r"lacks t10k-labels-idx1-ubyte \(or .*\.gz\)"),
        (
            lambda root: (root / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x09\x99" + b"\x00" * 20),
            r"train-images-idx3-ubyte is not an MNIST-format IDX file.*0x00000999",
        ),
        (
            lambda root: (root / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(11, dtype=np.uint8))),
            r"train-images-idx3-ubyte holds 12 images but .*train-labels-idx1-ubyte holds 11 labels",
        ),
        (
            lambda root: (root / "t10k-images-idx3-ubyte").write_bytes(
                (root / "t10k-images-idx3-ubyte").read_bytes()[:-5]
            ),
            r"t10k-images-idx3-ubyte holds .* bytes but its header announces \(8, 6, 6\)",
        ),
    ],
    ids=["missing-labels", "bad-magic", "count-mismatch", "truncated"],
)
def test_damaged_idx_files_are_refused_naming_the_file(tmp_path, damage, match):
    root = _write_idx_directory(tmp_path / "idx", compress=False)
    damage(root)
    with pytest.raises(ValueError, match=match):
        load_image_classification_data(root)


def test_uint8_storage_gives_the_batches_float_storage_gave(tmp_path):
    """Training batches, classifier inputs and sizes: bytes converted per batch equal a float32 copy of the data."""
    data = load_image_classification_data(_write_idx_directory(tmp_path / "idx", compress=True, per_class=8))
    as_float = to_model_range(data.train_images)
    assert as_float.dtype == torch.float32 and as_float.min() >= -1 and as_float.max() <= 1
    assert torch.equal(to_model_range(torch.tensor([0, 51, 255], dtype=torch.uint8)), torch.tensor([-1.0, -0.6, 1.0]))
    for step in range(3):
        draws = [
            training.draw_training_batch(images, data.train_labels, 8, training.step_generator(0, 0, step))
            for images in (data.train_images, as_float)
        ]
        for name in ("x_t", "t", "velocity", "class_labels"):
            assert torch.equal(getattr(draws[0], name), getattr(draws[1], name)), name
    assert data.nbytes == (32 + 8) * 36 + (32 + 8) * 8  # one byte per pixel, eight per int64 label
