"""Layer importance: I_l from the adapters, selection by |I_l|, the data probe, the plot."""

import copy

import pytest
import torch
from conftest import make_unet
from peft import get_peft_model
from torch.utils.data import DataLoader, TensorDataset

from funlora_peft import FunLoRAConfig, FunLoRALayer
from funlora_peft.continual.importance import (
    block_of,
    compute_layer_importance,
    plot_layer_importance,
    probe_layer_importance,
    random_target_modules,
    select_target_modules,
)


def conv_names(unet) -> list[str]:
    """The convs in U-Net (data-flow) order: UNet2DModel registers mid_block after up_blocks."""
    names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)]
    parts = ["conv_in", "down_blocks", "mid_block", "up_blocks", "conv_out"]
    return sorted(names, key=lambda n: [n.startswith(p) for p in parts].index(True))


def trained_like(model, seed=0):
    """Give every adapter tensor random non-zero values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "funlora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.fixture
def two_task_model(unet_name):
    model = get_peft_model(make_unet(unet_name), FunLoRAConfig(class_ids=[0, 1], function="cos"), "task_0")
    model.add_adapter("task_1", FunLoRAConfig(class_ids=[2, 3, 5], function="rshift", num_functions=4))
    trained_like(model)
    return model


def test_scores_equal_a_direct_computation_from_the_merged_weights(two_task_model, unet_name):
    scores = compute_layer_importance(two_task_model)
    names = conv_names(make_unet(unet_name))
    assert list(scores) == names  # every conv, in U-Net order, under its base-model name
    base = {n: m.weight.detach().double() for n, m in make_unet(unet_name).named_modules() if n in names}
    # F_y = W_y / W0 - 1, read back from each class's merged plain UNet; I_l = mean over classes of mean over (o, i).
    per_class = {n: [] for n in names}
    for y in [0, 1, 2, 3, 5]:
        merged = copy.deepcopy(two_task_model).merge_and_unload(class_label=y)
        weights = dict(merged.named_modules())
        for n in names:
            w0, wy = base[n], weights[n].weight.detach().double()
            # W_y[o, i] = (1 + F[o, i]) W0[o, i] at every kernel position: least squares over the kernel.
            f = (w0 * wy).sum(dim=(2, 3)) / (w0 * w0).sum(dim=(2, 3)) - 1
            per_class[n].append(f.mean().item())
    for n in names:
        direct = sum(per_class[n]) / len(per_class[n])
        assert scores[n] == pytest.approx(direct, rel=1e-3, abs=1e-5), n
    assert len({round(v, 6) for v in scores.values()}) > len(scores) // 2  # not a constant


def test_scores_of_some_adapters_and_layers_without_adapters_are_absent():
    unet = make_unet("attn")
    names = conv_names(unet)
    targets = [n for n in names if "resnets" in n]
    model = get_peft_model(unet, FunLoRAConfig(class_ids=[0], target_modules=targets), "task_0")
    model.add_adapter("task_1", FunLoRAConfig(class_ids=[1], target_modules=targets[:2]))
    trained_like(model)
    assert list(compute_layer_importance(model)) == targets
    only_1 = compute_layer_importance(model, adapter_names=["task_1"])
    assert list(only_1) == targets[:2]
    only_0 = compute_layer_importance(model, adapter_names="task_0")
    both = compute_layer_importance(model)
    for n in targets[:2]:  # one class per adapter: the pooled score is their mean
        assert both[n] == pytest.approx((only_0[n] + only_1[n]) / 2)
    with pytest.raises(ValueError, match=r"adapter_names=\['task_9'\].*loaded adapters: \['task_0', 'task_1'\]"):
        compute_layer_importance(model, adapter_names=["task_9"])
    with pytest.raises(ValueError, match="no FunLoRA layer"):
        compute_layer_importance(make_unet("attn"))


def test_a_new_identity_adapter_scores_zero():
    model = get_peft_model(make_unet("attn"), FunLoRAConfig(class_ids=[0, 1]), "task_0")
    assert all(v == 0.0 for v in compute_layer_importance(model).values())


def test_selection_by_absolute_score_in_unet_order():
    scores = {"conv_in": 0.01, "down.a": -0.5, "down.b": 0.2, "mid": 0.3, "up.a": -0.05, "conv_out": 0.0}
    assert select_target_modules(scores, top_k=3) == ["down.a", "down.b", "mid"]  # the sign does not matter
    assert select_target_modules(scores, top_k=2, largest=False) == ["conv_in", "conv_out"]
    assert select_target_modules(scores, fraction=0.5) == ["down.a", "down.b", "mid"]
    assert select_target_modules(scores, fraction=0.1) == ["down.a"]  # at least one layer
    assert select_target_modules(scores, top_k=6) == list(scores)
    tie = {"a": 0.1, "b": -0.1, "c": 0.1}
    assert select_target_modules(tie, top_k=2) == ["a", "b"]  # ties keep the earlier layer
    picked = random_target_modules(scores, 3, seed=1)
    assert picked == random_target_modules(scores, 3, seed=1) and len(set(picked)) == 3
    assert picked == [n for n in scores if n in picked]  # U-Net order
    assert {tuple(random_target_modules(scores, 3, seed=s)) for s in range(10)} != {tuple(picked)}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=0), r"top_k=0 must be an integer between 1 and the number of scored layers, 3"),
        (dict(top_k=4), r"top_k=4 must be"),
        (dict(top_k=2.0), r"top_k=2.0 must be"),
        (dict(fraction=0.0), r"fraction=0.0 must be in \(0, 1\]"),
        (dict(fraction=1.5), r"fraction=1.5 must be in"),
        (dict(), r"exactly one of top_k and fraction"),
        (dict(top_k=1, fraction=0.5), r"exactly one of top_k and fraction"),
    ],
)
def test_bad_selection_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_target_modules({"a": 1.0, "b": 2.0, "c": 3.0}, **kwargs)


def test_selected_names_configure_a_new_adapter():
    model = get_peft_model(make_unet("shortcut"), FunLoRAConfig(class_ids=[0, 1]), "task_0")
    trained_like(model)
    targets = select_target_modules(compute_layer_importance(model), top_k=4)
    model.add_adapter("task_1", FunLoRAConfig(class_ids=[2], target_modules=targets))
    adapted = [n for n, m in model.named_modules() if isinstance(m, FunLoRALayer) and "task_1" in m.funlora_a]
    assert [n.removeprefix("base_model.model.") for n in adapted] == targets


def digits_loader(classes=(0, 1), n=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 8, 8, generator=generator) * 2 - 1
    labels = torch.tensor([classes[i % len(classes)] for i in range(n)])
    return DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=False)


def test_probe_leaves_the_backbone_untouched_and_scores_every_conv():
    unet = make_unet("attn")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    scores = probe_layer_importance(unet, digits_loader(), steps=3, function="cos", num_functions=4)
    assert list(scores) == conv_names(unet)
    assert all(v != 0.0 for v in scores.values())  # the throwaway adapter moved away from the identity
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, FunLoRALayer) for m in unet.modules())
    # Same seed, same data: the same scores.
    assert probe_layer_importance(unet, digits_loader(), steps=3, function="cos", num_functions=4) == scores


def test_probe_on_a_peft_model_keeps_its_adapters_and_state():
    model = get_peft_model(make_unet("attn"), FunLoRAConfig(class_ids=[0, 1]), "task_0")
    trained_like(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = probe_layer_importance(model, digits_loader(classes=(2, 3)), steps=2, function="rshift", num_functions=3)
    assert len(scores) == len(conv_names(make_unet("attn")))
    assert list(model.peft_config) == ["task_0"] and model.active_adapter == "task_0"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match=r"class id|class_ids"):  # the probe's classes clash with task_0's
        probe_layer_importance(model, digits_loader(classes=(1, 2)), steps=1)
    with pytest.raises(ValueError, match=r"steps=0 must be a positive integer"):
        probe_layer_importance(model, digits_loader(classes=(2, 3)), steps=0)


def test_plot_marks_the_unet_parts(tmp_path):
    unet = make_unet("attn")
    names = conv_names(unet)
    assert [block_of(n) for n in (names[0], names[-1])] == ["in", "out"]
    parts = [block_of(n) for n in names]
    assert parts == sorted(parts, key=["in", "down", "mid", "up", "out"].index)  # the data-flow order
    assert {block_of(n) for n in names} == {"in", "down", "mid", "up", "out"}
    scores = {n: (j - 5) / 10 for j, n in enumerate(names)}
    path = tmp_path / "importance.png"
    fig = plot_layer_importance(scores, path, selected=select_target_modules(scores, top_k=5), title="probe")
    assert path.stat().st_size > 5000
    ax = fig.axes[0]
    assert len(ax.patches) == len(names)
    assert [round(p.get_height(), 6) for p in ax.patches] == [round(abs(v), 6) for v in scores.values()]
