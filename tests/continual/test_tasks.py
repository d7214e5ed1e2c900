"""The class-incremental task layout and one task's images."""

import pytest
import torch

from funlora_peft.continual.data import load_image_classification_data
from funlora_peft.continual.tasks import make_task_layout, parse_class_order, task_dataset


@pytest.fixture(scope="module")
def digits():
    return load_image_classification_data("digits", resolution=16)


def test_task_layout_equal_tasks_and_first_task():
    assert make_task_layout(range(10), classes_per_task=2) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert make_task_layout(range(10), classes_per_task=2, first_task_classes=4) == [
        [0, 1, 2, 3],
        [4, 5],
        [6, 7],
        [8, 9],
    ]
    # Class ids are sorted whatever order they come in; CIFAR-100 "20-20" is 5 tasks of 20.
    assert make_task_layout([3, 1, 2, 0], classes_per_task=4) == [[0, 1, 2, 3]]
    assert [len(task) for task in make_task_layout(range(100), classes_per_task=20)] == [20] * 5


def test_task_layout_shuffle_is_seeded():
    first = make_task_layout(range(10), classes_per_task=5, class_order="shuffle", seed=0)
    assert first == make_task_layout(torch.arange(10), classes_per_task=5, class_order="shuffle", seed=0)
    assert sorted(sum(first, [])) == list(range(10))
    assert sum(first, []) != list(range(10))
    assert first != make_task_layout(range(10), classes_per_task=5, class_order="shuffle", seed=1)


def test_task_layout_explicit_order():
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert make_task_layout(range(10), classes_per_task=5, class_order=order) == [order[:5], order[5:]]
    assert make_task_layout(range(10), classes_per_task=5, class_order="9,8,7,6,5, 4,3,2,1,0") == [
        order[:5],
        order[5:],
    ]
    assert parse_class_order("sorted") is None and parse_class_order("shuffle") == "shuffle"
    with pytest.warns(UserWarning, match=r"classes \[0, 1\] are left out"):
        tasks = make_task_layout(range(4), classes_per_task=1, class_order=[3, 2])
    assert tasks == [[3], [2]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(classes_per_task=2, class_order=[0, 1, 10, 11]), r"class ids \[10, 11\] that the data lacks; available"),
        (dict(classes_per_task=2, class_order="0,1,1,2"), r"class ids \[1\] more than once"),
        (dict(classes_per_task=3), r"Valid classes_per_task: \[1, 2, 5, 10\]; .* first_task_classes to one of"),
        (dict(classes_per_task=4, first_task_classes=4), r"remaining 6 .* Valid classes_per_task: \[1, 2, 3, 6\]"),
        (dict(classes_per_task=2, first_task_classes=11), r"first_task_classes=11 exceeds the 10 classes"),
        (dict(classes_per_task=0), r"classes_per_task must be >= 1, got classes_per_task=0"),
        (dict(classes_per_task=2, class_order="random"), r"class_order='random' is neither one of"),
    ],
)
def test_task_layout_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_task_layout(range(10), **kwargs)


def test_task_layout_type_errors():
    with pytest.raises(TypeError, match="classes_per_task must be an integer"):
        make_task_layout(range(10), classes_per_task=2.5)
    with pytest.raises(TypeError, match="class_order must contain integer class ids"):
        make_task_layout(range(10), classes_per_task=2, class_order=[0.5])


def test_task_dataset(digits):
    tasks = make_task_layout(digits.class_ids, classes_per_task=2)
    train = task_dataset(digits, tasks[1])
    test = task_dataset(digits, sum(tasks[:2], []), split="test")
    image, label = train[0]
    assert image.shape == (1, 16, 16) and label.dtype == torch.int64
    assert set(train.tensors[1].tolist()) == {2, 3}
    assert len(train) == int(torch.isin(digits.train_labels, torch.tensor([2, 3])).sum())
    assert set(test.tensors[1].tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match=r"class_ids \[10\] are not classes of 'digits'; available class ids"):
        task_dataset(digits, [1, 10])
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got split='val'"):
        task_dataset(digits, [1], split="val")
