"""What each task trains, the protocol's UNet, and the randomness of every training step."""

import pickle

import pytest
import torch
from conftest import make_unet
from diffusers import UNet2DModel
from peft import get_peft_model

from funlora_peft.continual.training import (
    TrainingDiverged,
    check_loss,
    draw_training_batch,
    optimizer_groups,
    set_trainable,
    step_generator,
    task_adapter_config,
    trainable_parameter_names,
    unet_config,
)


def test_step_generator_depends_only_on_its_key():
    draw = lambda *key: torch.randn(4, generator=step_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 1, 2), draw(0, 1, 2))
    assert not torch.equal(draw(0, 1, 2), draw(0, 2, 1))
    assert not torch.equal(draw(0, 1, 2), draw(1, 1, 2))


def test_a_training_batch_depends_on_its_generator_only():
    images = torch.rand(10, 1, 8, 8) * 2 - 1
    labels = torch.arange(10) % 3
    first = draw_training_batch(images, labels, 6, step_generator(0, 1, 2))
    again = draw_training_batch(images, labels, 6, step_generator(0, 1, 2))
    assert all(torch.equal(getattr(first, k), getattr(again, k)) for k in ("x_t", "t", "velocity", "class_labels"))
    # each process takes its contiguous share of the same global batch
    halves = [
        draw_training_batch(images, labels, 6, step_generator(0, 1, 2), process_index=i, num_processes=2)
        for i in (0, 1)
    ]
    assert torch.equal(torch.cat([h.x_t for h in halves]), first.x_t)


def test_task_0_trains_the_backbone_and_its_adapter_later_tasks_only_theirs():
    model = get_peft_model(make_unet("attn"), task_adapter_config([0, 1], 0, seed=3), adapter_name="task_0")
    model.add_adapter("task_1", task_adapter_config([2, 3], 1, seed=3))
    names = set_trainable(model, 0)
    assert names == trainable_parameter_names(model, 0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert any("funlora_" not in n for n in names) and not any(n.endswith(".task_1") for n in names)
    groups = optimizer_groups(model, 0, learning_rate=1e-3, adapter_learning_rate=1e-1)
    assert [g["lr"] for g in groups] == [1e-3, 1e-1] and sum(len(g["params"]) for g in groups) == len(names)
    names = set_trainable(model, 1)
    assert names and all("funlora_" in n and n.endswith(".task_1") for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    (group,) = optimizer_groups(model, 1, learning_rate=1e-3, adapter_learning_rate=1e-1)
    assert group["lr"] == 1e-1 and len(group["params"]) == len(names)


def test_a_task_adapter_init_depends_on_the_seed_and_task_only():
    assert task_adapter_config([2, 3], 1, seed=3).init_seed == task_adapter_config([5], 1, seed=3).init_seed
    assert task_adapter_config([2, 3], 1, seed=3).init_seed != task_adapter_config([2, 3], 2, seed=3).init_seed
    assert task_adapter_config([2, 3], 1, seed=3, function="rshift").function == "rshift"


def test_unet_config_builds_the_protocol_unet():
    config = unet_config(resolution=16, num_channels=3, block_out_channels=(16, 32), attention_level=1)
    unet = UNet2DModel(**config)
    assert unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D")
    assert unet.config.up_block_types == ("AttnUpBlock2D", "UpBlock2D")
    assert unet.config.class_embed_type is None and unet.config.num_class_embeds is None
    assert "Attn" not in "".join(
        unet_config(resolution=8, num_channels=1, block_out_channels=(8, 8))["down_block_types"]
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_out_channels=(16, 30)), r"widths \[30\] do not divide by norm_num_groups=8"),
        (dict(resolution=10, block_out_channels=(8, 8, 8)), r"resolution=10 must divide by 2\^\(levels - 1\) = 4"),
        (dict(block_out_channels=(8, 8), attention_level=2), r"attention_level=2 must be None or a level in 0..1"),
        (dict(layers_per_block=0), r"layers_per_block must be an integer >= 1, got 0"),
    ],
)
def test_unet_config_refuses_what_cannot_work(kwargs, match):
    base = dict(resolution=16, num_channels=1, block_out_channels=(16, 32))
    with pytest.raises(ValueError, match=match):
        unet_config(**{**base, **kwargs})


def test_class_balanced_batches_are_laid_out_for_one_convolution_per_conv():
    images = torch.rand(30, 1, 8, 8) * 2 - 1
    labels = torch.tensor([7] * 5 + [2] * 20 + [4] * 5)  # unequal class sizes
    batch = draw_training_batch(
        images, labels, 12, step_generator(0, 1, 0), class_balanced=True, class_order=[4, 7, 2]
    )
    assert batch.class_labels.tolist() == [4, 7, 2] * 4  # slot j * C + c
    halves = [
        draw_training_batch(
            images,
            labels,
            12,
            step_generator(0, 1, 0),
            class_balanced=True,
            class_order=[4, 7, 2],
            process_index=i,
            num_processes=2,
        )  # fmt: skip
        for i in (0, 1)
    ]
    assert all(h.class_labels.tolist() == [4, 7, 2] * 2 for h in halves)
    assert torch.equal(torch.cat([h.x_t for h in halves]), batch.x_t)
    # the routing takes such a batch as it is: no reordering, no padding
    model = get_peft_model(make_unet("attn"), task_adapter_config([4, 7, 2], 0, seed=0), adapter_name="task_0")
    plan = model.base_model.routing_plan(batch.class_labels, 12)
    assert plan.gather is None and plan.chunk == 4 and plan.class_ids == [4, 7, 2]
    with pytest.raises(ValueError, match=r"batch of each process \(10\) to be a multiple of the 3 classes"):
        draw_training_batch(images, labels, 10, step_generator(0, 1, 0), class_balanced=True)


def test_a_loss_that_is_not_finite_stops_training_with_its_task_and_step():
    check_loss(torch.tensor([0.5, 2.0]), task=1, step=3)  # every process's loss finite: nothing
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(TrainingDiverged) as info:
            check_loss(torch.tensor([0.5, value]), task=2, step=7)
        assert (info.value.task, info.value.step) == (2, 7)
        assert str(info.value.loss) == str(value)
        assert str(info.value).startswith(f"training diverged: the loss of task 2 is {value} at step 7 of the task")
        assert "adapter task_2 only" in str(info.value)
        # a job in a worker process reports it to the parent: it survives pickling with its fields
        again = pickle.loads(pickle.dumps(info.value))
        assert (type(again), again.task, again.step, str(again)) == (TrainingDiverged, 2, 7, str(info.value))
    with pytest.raises(TrainingDiverged, match="which trains the backbone and adapter task_0"):
        check_loss(float("nan"), task=0, step=1)
