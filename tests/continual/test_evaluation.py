"""Tests of funlora_peft.continual.evaluation on sklearn's 8x8 digits (real data, no download) and closed forms."""

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from funlora_peft.continual.data import ImageClassificationData
from funlora_peft.continual.evaluation import (
    AccuracyMatrix,
    ContinualEvaluator,
    SmallClassifier,
    TaskMetrics,
    accuracy,
    class_seed,
    classification_accuracy_score,
    evaluate_stage,
    forgetting,
    frechet_distance,
    generate_per_class,
    real_data_accuracy,
    recognition_accuracy,
    recognition_accuracy_per_class,
    recognition_accuracy_per_task,
    train_classifier,
)

NUM_CLASSES = 10
EPOCHS = 10


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # The classifiers are tiny: on a few cores shared with other processes, intra-op threads mostly spin and make
    # training over 10x slower than one thread.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def digits():
    """(train_x, train_y, test_x, test_y): 8x8 digits scaled from 0..16 to [-1, 1], a stratified 2/3-1/3 split."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(data.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=1 / 3, random_state=0, stratify=data.target
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


@pytest.fixture(scope="module")
def real_classifier(digits):
    train_x, train_y, _, _ = digits
    return train_classifier(train_x, train_y, num_classes=NUM_CLASSES, epochs=EPOCHS, seed=0)


def _fake_sample_fn(class_label, num_samples, generator):
    return torch.randn(num_samples, 1, 8, 8, generator=generator)


# ---------------------------------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels, resolution", [(1, 8), (1, 16), (3, 32), (1, 28)])
def test_small_classifier_shapes(in_channels, resolution):
    model = SmallClassifier(in_channels, NUM_CLASSES, resolution)
    x = torch.zeros(2, in_channels, resolution, resolution)
    assert model(x).shape == (2, NUM_CLASSES)
    assert model.features(x).shape == (2, model.num_features)


def test_small_classifier_rejects_wrong_shape():
    model = SmallClassifier(1, NUM_CLASSES, 16)
    with pytest.raises(ValueError, match=r"expects images of shape \(batch, 1, 16, 16\), got \(2, 1, 8, 8\)"):
        model(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="`num_classes` must be at least 2"):
        SmallClassifier(1, 1, 16)


def test_classifier_beats_0_95_on_real_digits(digits, real_classifier):
    _, _, test_x, test_y = digits
    test_accuracy = accuracy(real_classifier, test_x, test_y)
    print(f"real-data classifier test accuracy on 8x8 digits: {test_accuracy:.4f}")
    assert test_accuracy > 0.95
    assert not real_classifier.training


def test_train_classifier_is_deterministic_and_leaves_global_rng(digits):
    train_x, train_y, _, _ = digits
    x, y = train_x[:128], train_y[:128]
    rng_state = torch.get_rng_state()
    first = train_classifier(x, y, num_classes=NUM_CLASSES, steps=5, seed=3, augment=True)
    assert torch.equal(torch.get_rng_state(), rng_state)
    second = train_classifier(x, y, num_classes=NUM_CLASSES, steps=5, seed=3, augment=True)
    other = train_classifier(x, y, num_classes=NUM_CLASSES, steps=5, seed=4, augment=True)
    first_state, second_state, other_state = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)
    assert not all(torch.equal(first_state[k], other_state[k]) for k in first_state)


def test_train_classifier_validates_labels(digits):
    train_x, train_y, _, _ = digits
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=5\), got values in \[0, 9\]"):
        train_classifier(train_x, train_y, num_classes=5, steps=1)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        train_classifier(train_x, train_y.float(), num_classes=NUM_CLASSES, steps=1)


# ---------------------------------------------------------------------------------------------------------------
# CAS
# ---------------------------------------------------------------------------------------------------------------


def test_cas_on_real_training_images_is_the_real_classifier_accuracy(digits, real_classifier):
    train_x, train_y, test_x, test_y = digits
    result = real_data_accuracy(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES, epochs=EPOCHS, seed=0)
    # Same data, seed and schedule as the `real_classifier` fixture, and the mask over all 10 classes is a no-op.
    assert result.accuracy == accuracy(real_classifier, test_x, test_y)
    assert result.num_train_samples == len(train_y) and result.num_test_samples == len(test_y)
    assert sorted(result.per_class_accuracy) == list(range(NUM_CLASSES))
    counts = torch.bincount(test_y, minlength=NUM_CLASSES).double()
    per_class = torch.tensor([result.per_class_accuracy[c] for c in range(NUM_CLASSES)], dtype=torch.float64)
    assert (per_class * counts).sum().item() / counts.sum().item() == pytest.approx(result.accuracy, abs=1e-12)


def test_cas_with_shuffled_labels_is_near_chance(digits):
    train_x, train_y, test_x, test_y = digits
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))]
    result = classification_accuracy_score(train_x, shuffled, test_x, test_y, num_classes=NUM_CLASSES, epochs=5)
    print(f"CAS with shuffled labels: {result.accuracy:.4f} (chance 0.1)")
    assert result.accuracy < 0.3


def test_cas_only_uses_the_classes_passed(digits):
    train_x, train_y, test_x, test_y = digits
    seen = [0, 1, 2]
    # Classes 3..9 are replaced by noise: if CAS trained or tested on them, the two results below would differ.
    polluted_x = torch.where(
        torch.isin(train_y, torch.tensor(seen))[:, None, None, None], train_x, torch.rand_like(train_x) * 2 - 1
    )
    keep = torch.isin(train_y, torch.tensor(seen))
    kwargs = dict(num_classes=NUM_CLASSES, class_ids=seen, epochs=5, seed=1)
    polluted = classification_accuracy_score(polluted_x, train_y, test_x, test_y, **kwargs)
    clean = classification_accuracy_score(train_x[keep], train_y[keep], test_x, test_y, **kwargs)
    print(f"CAS on classes {seen}: {clean.accuracy:.4f}")
    assert polluted.accuracy == clean.accuracy
    assert torch.equal(polluted.test_predictions, clean.test_predictions)
    assert clean.class_ids == seen and sorted(clean.per_class_accuracy) == seen
    assert clean.num_train_samples == int(keep.sum())
    assert clean.num_test_samples == int(torch.isin(test_y, torch.tensor(seen)).sum())
    assert set(clean.test_predictions.tolist()) <= set(seen)
    assert clean.accuracy > 0.9
    per_task = clean.per_task_accuracy([[0], [1, 2]])
    assert per_task[0] == clean.per_class_accuracy[0]
    labels = clean.test_labels
    task_1 = (labels == 1) | (labels == 2)
    assert per_task[1] == (clean.test_predictions[task_1] == labels[task_1]).double().mean().item()


def test_cas_validates_classes(digits):
    train_x, train_y, test_x, test_y = digits
    no_test_9 = test_y != 9
    with pytest.raises(ValueError, match=r"test set has no images of classes \[9\]"):
        classification_accuracy_score(train_x, train_y, test_x[no_test_9], test_y[no_test_9], num_classes=10, steps=1)
    with pytest.raises(ValueError, match="`class_ids` must not repeat a class"):
        classification_accuracy_score(train_x, train_y, test_x, test_y, num_classes=10, class_ids=[1, 1], steps=1)
    only_0 = train_y == 0
    with pytest.warns(UserWarning, match=r"No generated samples of classes \[1\]"):
        result = classification_accuracy_score(
            train_x[only_0], train_y[only_0], test_x, test_y, num_classes=10, class_ids=[0, 1], steps=20
        )
    assert result.per_class_accuracy[1] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Recognition accuracy and forgetting
# ---------------------------------------------------------------------------------------------------------------


def test_recognition_accuracy(digits, real_classifier):
    _, _, test_x, test_y = digits
    recognition = recognition_accuracy(real_classifier, test_x, test_y)
    assert recognition > 0.95
    threes = test_x[test_y == 3]
    mislabelled = recognition_accuracy(real_classifier, threes, torch.full((len(threes),), 5))
    print(f"recognition of real test digits: {recognition:.4f}; of 3s labelled 5: {mislabelled:.4f}")
    assert mislabelled < 0.05

    per_class = recognition_accuracy_per_class(real_classifier, test_x, test_y)
    assert sorted(per_class) == list(range(NUM_CLASSES)) and min(per_class.values()) > 0.85
    assert np.isnan(recognition_accuracy_per_class(real_classifier, test_x, test_y, class_ids=[0, 11])[11])

    tasks = [[0, 1], [2, 3, 4]]
    per_task = recognition_accuracy_per_task(real_classifier, test_x, test_y, tasks)
    for task, value in zip(tasks, per_task):
        keep = torch.isin(test_y, torch.tensor(task))
        assert value == recognition_accuracy(real_classifier, test_x[keep], test_y[keep])


def test_forgetting_closed_form():
    assert forgetting([[1.0], [0.8, 0.9], [0.6, 0.9, 0.95]]) == pytest.approx(0.2, abs=1e-12)
    assert forgetting([[0.9], [0.7, 0.8]]) == pytest.approx(0.2, abs=1e-12)
    assert forgetting([[0.9], [0.9, 0.8], [0.9, 0.8, 0.3]]) == 0.0
    assert forgetting([[0.4]]) == 0.0
    assert forgetting([[0.5], [0.7, 0.9]]) == pytest.approx(-0.2, abs=1e-12)  # backward transfer
    nan = float("nan")
    assert forgetting(np.array([[1.0, nan], [0.6, 0.9]])) == pytest.approx(0.4, abs=1e-12)
    with pytest.raises(ValueError, match="at least one row"):
        forgetting([])
    with pytest.raises(ValueError, match=r"Row 1 of the accuracy matrix needs the accuracy of tasks 0..1"):
        forgetting([[1.0], [0.5]])


def test_accuracy_matrix():
    matrix = AccuracyMatrix()
    matrix.append([1.0])
    matrix.append({1: 0.9, 0: 0.8})
    matrix.append([0.6, 0.9, 0.95])
    assert matrix.rows == [[1.0], [0.8, 0.9], [0.6, 0.9, 0.95]]
    assert matrix.forgetting() == pytest.approx(0.2, abs=1e-12)
    assert matrix.average_accuracy() == pytest.approx((0.6 + 0.9 + 0.95) / 3, abs=1e-12)
    table = matrix.to_tensor()
    assert table.shape == (3, 3) and torch.isnan(table[0, 1:]).all() and table[2, 2] == 0.95
    with pytest.raises(ValueError, match=r"Row 3 needs the accuracy of exactly the tasks 0..3, got tasks \[0, 1\]"):
        matrix.append({0: 1.0, 1: 1.0})
    with pytest.raises(ValueError, match=r"Row 3 needs the accuracy of tasks 0..3 \(4 values\), got 2"):
        matrix.append([1.0, 1.0])


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------------------


def _scipy_frechet(features_a: np.ndarray, features_b: np.ndarray) -> float:
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    with warnings.catch_warnings():
        # The covariances are singular (constant border pixels, dead ReLU features); sqrtm still converges but warns.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_frechet_distance_on_classifier_features(digits, real_classifier):
    _, _, test_x, _ = digits
    generator = torch.Generator().manual_seed(0)
    noisy = (test_x + 0.5 * torch.randn(test_x.shape, generator=generator)).clamp(-1, 1)
    slightly_noisy = (test_x + 0.1 * torch.randn(test_x.shape, generator=generator)).clamp(-1, 1)

    same = frechet_distance(real_classifier, test_x, test_x)
    small = frechet_distance(real_classifier, test_x, slightly_noisy)
    large = frechet_distance(real_classifier, test_x, noisy)
    shifted = frechet_distance(real_classifier, test_x, (test_x + 0.5).clamp(-1, 1))
    print(f"FD identical {same:.2e}, noise 0.1 {small:.3f}, noise 0.5 {large:.3f}, shift 0.5 {shifted:.3f}")
    assert same < 1e-3 * large
    assert 0 < small < large and shifted > 10 * same

    with torch.no_grad():
        features_real = real_classifier.features(test_x).double().numpy()
        features_noisy = real_classifier.features(noisy).double().numpy()
    assert large == pytest.approx(_scipy_frechet(features_real, features_noisy), rel=1e-4)
    assert not real_classifier.training


def test_frechet_distance_with_a_plain_module_matches_scipy(digits):
    train_x, _, test_x, _ = digits
    flatten = nn.Flatten()  # pixels as features: exercises the `forward` path and the probing of the feature size
    value = frechet_distance(flatten, train_x, test_x, batch_size=100)
    expected = _scipy_frechet(train_x.flatten(1).double().numpy(), test_x.flatten(1).double().numpy())
    assert value == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="`generated_images` must be a tensor .* with batch >= 2"):
        frechet_distance(flatten, train_x, test_x[:1])


# ---------------------------------------------------------------------------------------------------------------
# Sampling and one stage
# ---------------------------------------------------------------------------------------------------------------


def test_generate_per_class_is_independent_of_the_other_classes():
    alone, alone_labels = generate_per_class(_fake_sample_fn, [3], 4, seed=7)
    together, together_labels = generate_per_class(_fake_sample_fn, [1, 3, 5], 4, seed=7)
    reordered, _ = generate_per_class(_fake_sample_fn, [5, 3], 4, seed=7)
    assert together.shape == (12, 1, 8, 8)
    assert together_labels.tolist() == [1] * 4 + [3] * 4 + [5] * 4 and alone_labels.tolist() == [3] * 4
    assert torch.equal(alone, together[4:8]) and torch.equal(alone, reordered[4:8])
    assert not torch.equal(together[0:4], together[4:8])
    other_seed, _ = generate_per_class(_fake_sample_fn, [3], 4, seed=8)
    assert not torch.equal(alone, other_seed)
    assert class_seed(7, 3) == 7 * 100003 + 3

    chunked, chunked_labels = generate_per_class(_fake_sample_fn, [3, 4], 5, seed=7, batch_size=2)
    assert chunked.shape == (10, 1, 8, 8) and chunked_labels.tolist() == [3] * 5 + [4] * 5


def test_generate_per_class_validates():
    with pytest.raises(ValueError, match=r"must return a tensor of shape \(4, channels, height, width\), got \(3,"):
        generate_per_class(lambda c, n, g: torch.zeros(n - 1, 1, 8, 8), [0], 4, seed=0)
    with pytest.raises(ValueError, match="`class_ids` must not repeat a class"):
        generate_per_class(_fake_sample_fn, [2, 2], 4, seed=0)


def test_evaluate_stage(digits, real_classifier):
    train_x, train_y, test_x, test_y = digits
    tasks = [[0, 1], [2, 3]]
    # Real training images stand in for a perfect generator of the classes 0..3 (class 9 must be ignored).
    keep = torch.isin(train_y, torch.tensor([0, 1, 2, 3, 9]))
    stage = evaluate_stage(
        real_classifier, test_x, test_y, tasks, train_x[keep], train_y[keep], num_classes=NUM_CLASSES, epochs=5
    )
    assert isinstance(stage, TaskMetrics)
    assert stage.task == 1 and stage.class_ids == [2, 3] and stage.seen_class_ids == [0, 1, 2, 3]
    assert stage.cas > 0.9 and len(stage.cas_per_task) == 2
    seen = torch.isin(train_y, torch.tensor([0, 1, 2, 3]))
    assert stage.recognition == recognition_accuracy(real_classifier, train_x[seen], train_y[seen])
    assert stage.accuracy_per_task == recognition_accuracy_per_task(
        real_classifier, train_x[seen], train_y[seen], tasks
    )
    assert stage.fd is not None and stage.fd >= 0 and len(stage.fd_per_task) == 2
    per_class = recognition_accuracy_per_class(real_classifier, train_x[seen], train_y[seen])
    assert stage.recognition_per_class == {str(c): per_class[c] for c in [0, 1, 2, 3]}
    assert list(stage.cas_per_class) == ["0", "1", "2", "3"] and all(0 <= v <= 1 for v in stage.cas_per_class.values())
    matrix = AccuracyMatrix()
    matrix.append(stage.accuracy_per_task[:1])
    matrix.append(stage.accuracy_per_task)
    assert matrix.forgetting() == 0.0

    with pytest.raises(ValueError, match=r"No generated samples of classes \[2, 3\]"):
        only_01 = train_y <= 1
        evaluate_stage(
            real_classifier, test_x, test_y, tasks, train_x[only_01], train_y[only_01], num_classes=NUM_CLASSES
        )


# ---------------------------------------------------------------------------------------------------------------
# ContinualEvaluator
# ---------------------------------------------------------------------------------------------------------------


class _CountingSampler:
    """A deterministic generator of each class (noise from the class's own generator, shifted by the class id) that
    records which classes it was asked for; `drift` shifts the outputs of class 0 (an old class that changed)."""

    def __init__(self):
        self.calls, self.drift = [], 0.0

    def __call__(self, class_label, num_samples, generator):
        self.calls.append(class_label)
        images = torch.randn(num_samples, 1, 8, 8, generator=generator).clamp(-1, 1) * 0.5 + class_label / 10
        return images + (self.drift if class_label == 0 else 0.0)


def _evaluator(digits, classifier, **kwargs):
    train_x, train_y, test_x, test_y = digits
    data = ImageClassificationData(train_x, train_y, test_x, test_y, [str(c) for c in range(10)], 1, 8, "digits")
    tasks = [[0, 1], [2, 3]]
    return ContinualEvaluator(
        data, tasks, seed=3, samples_per_class=6, classifier=classifier, cas_steps_per_class=5, **kwargs
    )


def test_reusing_old_samples_gives_the_rows_of_sampling_everything(digits, real_classifier):
    rows = {}
    for reuse in (False, True):
        evaluator, sampler = _evaluator(digits, real_classifier, reuse_old_samples=reuse), _CountingSampler()
        rows[reuse] = [evaluator.evaluate(sampler, task)[0] for task in (0, 1)]
        # Reusing: after task 1 only the new classes 2, 3 are sampled in full; then every class's 4 probe samples.
        expected = [0, 1, 0, 1, 2, 3, 0, 1, 2, 3] if reuse else [0, 1, 0, 1, 2, 3]
        assert sampler.calls == expected
    for plain, reused in zip(rows[False], rows[True]):
        for name in ("cas", "recognition", "fd", "samples_sha256", "cas_per_class", "recognition_per_class"):
            assert getattr(plain, name) == getattr(reused, name), name
    assert rows[True][1].old_samples_identical is True


def test_a_changed_old_class_is_caught_by_the_probes(digits, real_classifier):
    evaluator, sampler = _evaluator(digits, real_classifier, reuse_old_samples=True), _CountingSampler()
    evaluator.evaluate(sampler, 0)
    sampler.drift = 0.25  # class 0's outputs change: the reused samples no longer stand for the model
    assert evaluator.evaluate(sampler, 1)[0].old_samples_identical is False
