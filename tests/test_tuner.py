"""The FunLoRA tuner on tiny UNet2DModels: one matrix over UNet configs x function families."""

import collections
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import UNET_CONFIGS, make_inputs, make_unet
from diffusers import UNet2DModel
from peft import PeftConfig, PeftModel, get_model_status, get_peft_model, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import funlora_peft
from funlora_peft import FunLoRAConfig, FunLoRALayer

FAMILIES = {"cos": 10, "rshift": 10, "power": 10, "linear": 1}


@pytest.fixture(params=sorted(FAMILIES))
def function(request):
    return request.param


def two_task_model(unet_name: str, function: str, seed: int = 0):
    """A PeftModel with task_0 (classes 0, 1) and task_1 (classes 2, 3, 5), random non-identity adapters."""
    unet = make_unet(unet_name, seed=seed)
    p = FAMILIES[function]
    model = get_peft_model(unet, FunLoRAConfig(class_ids=[0, 1], function=function, num_functions=p), "task_0")
    model.add_adapter("task_1", FunLoRAConfig(class_ids=[2, 3, 5], function=function, num_functions=p))
    randomize_adapters(model, seed=seed + 1)
    return model


def randomize_adapters(model, seed: int = 1, scale: float = 0.5, omega: bool = True) -> None:
    """Give every adapter random alpha (and, if `omega`, random omega), so that no adapter is the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".funlora_alpha." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
            elif omega and ".funlora_omega." in name:
                param.copy_(torch.rand(param.shape, generator=generator) * 3)


def funlora_layers(model):
    return [m for m in model.modules() if isinstance(m, FunLoRALayer)]


def backbone_state(model):
    """Clones of the base model's own tensors (no adapter tensors)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "funlora_" not in k}


MIXED = torch.tensor([0, 3, 2, 1, 5, 0])


def inputs64(unet, batch_size: int, seed: int = 1):
    """`make_inputs` in float64, for comparisons whose only differences are rounding."""
    x_t, t = make_inputs(unet, batch_size=batch_size, seed=seed)
    return x_t.double(), t.double()


# ---------------------------------------------------------------------------------------------------------------------
# 1. identity at init


def test_identity_at_init(unet_name, function):
    # Frozen like the backbone inside the PeftModel: on CPU, torch takes another (numerically different in the last
    # bit) Linear kernel when the weights do not require grad.
    unet = make_unet(unet_name).requires_grad_(False).double()
    x_t, t = inputs64(unet, batch_size=6)
    with torch.no_grad():
        base = unet(x_t, t).sample
    p = FAMILIES[function]
    model = get_peft_model(unet, FunLoRAConfig(class_ids=[0, 1], function=function, num_functions=p), "task_0")
    model.add_adapter("task_1", FunLoRAConfig(class_ids=[2, 3, 5], function=function, num_functions=p))
    with torch.no_grad():
        mixed = model(x_t, t, class_labels=MIXED).sample
        single = model(x_t, t, class_labels=torch.full((6,), 3)).sample
    # One class: W_y = W0 * (1 + 0) = W0 exactly, the same convolution as the base UNet.
    assert torch.equal(single, base)
    # Mixed: the same weights, but each class's samples go through their own (smaller) convolution: in float64 the
    # results agree to rounding (~1e-16 relative, accumulated over a few hundred terms per output).
    torch.testing.assert_close(mixed, base, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------------
# 2. mixed batches: per-sample routing equals single-class batches and the merged plain UNet


def test_mixed_batch_matches_single_class_and_merged(unet_name, function):
    model = two_task_model(unet_name, function).double()  # float64: equal up to rounding, ~1e-15
    x_t, t = inputs64(model.base_model.model, batch_size=6)
    with torch.no_grad():
        mixed = model(x_t, t, class_labels=MIXED).sample
        with model.disable_adapter():
            base = model(x_t, t).sample
    assert (mixed - base).abs().max() > 1e-3, "random adapters must change the output"
    for class_id in MIXED.unique().tolist():
        idx = (MIXED == class_id).nonzero().flatten()
        with torch.no_grad():
            alone = model(x_t[idx], t[idx], class_labels=MIXED[idx]).sample
        torch.testing.assert_close(mixed[idx], alone, rtol=0, atol=1e-10)

    for class_id in [0, 5]:
        idx = (MIXED == class_id).nonzero().flatten()
        model_copy = two_task_model(unet_name, function).double()
        plain = model_copy.merge_and_unload(class_label=class_id)
        assert type(plain) is UNet2DModel
        assert not funlora_layers(plain)
        with torch.no_grad():
            merged_out = plain(x_t[idx], t[idx]).sample
        torch.testing.assert_close(mixed[idx], merged_out, rtol=0, atol=1e-10)


def test_labels_can_be_int_list_or_positional(unet_name):
    model = two_task_model(unet_name, "rshift")
    x_t, t = make_inputs(model.base_model.model, batch_size=3)
    with torch.no_grad():
        ref = model(x_t, t, class_labels=torch.tensor([2, 2, 2])).sample
        assert torch.equal(model(x_t, t, class_labels=2).sample, ref)
        assert torch.equal(model(x_t, t, class_labels=[2, 2, 2]).sample, ref)
        assert torch.equal(model.base_model.model(x_t, t, torch.tensor([2, 2, 2])).sample, ref)
        assert torch.equal(model(x_t, t, class_labels=np.array([2, 2, 2])).sample, ref)
    # numpy integers are class ids wherever a class id is taken, and are stored as plain ints
    assert FunLoRAConfig(class_ids=np.arange(2, 4)).class_ids == [2, 3]
    assert type(FunLoRAConfig(class_ids=[np.int64(5)]).class_ids[0]) is int


# ---------------------------------------------------------------------------------------------------------------------
# 3. no forgetting


def test_training_new_task_leaves_old_classes_bit_identical(unet_name, function):
    model = two_task_model(unet_name, function)
    model.set_adapter("task_1")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".task_1" in n for n in trainable)
    unet = model.base_model.model
    x_t, t = make_inputs(unet, batch_size=6)
    old = torch.tensor([0, 1, 1, 0, 0, 1])
    with torch.no_grad():
        before = model(x_t, t, class_labels=old).sample
        before_new = model(x_t, t, class_labels=torch.tensor([2, 3, 5, 2, 3, 5])).sample
    backbone = backbone_state(model)
    old_adapter = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".task_0")}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        labels = torch.tensor([0, 2, 3, 1, 5, 2])  # mixes old and new classes
        loss = (model(x_t, t, class_labels=labels).sample - 1.0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(x_t, t, class_labels=old).sample
        after_new = model(x_t, t, class_labels=torch.tensor([2, 3, 5, 2, 3, 5])).sample
    assert torch.equal(before, after)
    assert not torch.equal(before_new, after_new), "the new task must have trained"
    for k, v in backbone_state(model).items():
        assert torch.equal(v, backbone[k]), k
    for k, v in old_adapter.items():
        assert torch.equal(model.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------------------------------
# 4. ranks of F_y


def _rank(matrix: torch.Tensor) -> int:
    s = torch.linalg.svdvals(matrix.double())
    return int((s > 1e-6 * s[0]).sum())


@pytest.mark.parametrize("function", sorted(FAMILIES))
def test_rank_of_functional_matrix(function):
    p = FAMILIES[function]
    unet = make_unet("attn")
    model = get_peft_model(unet, FunLoRAConfig(class_ids=list(range(8)), function=function, num_functions=p), "t0")
    # random a, b ~ N(0, 1) and alpha; omega as initialised (omega_i = i)
    randomize_adapters(model, seed=3, scale=1.0, omega=False)
    layers = [m for m in funlora_layers(model) if min(m.in_channels, m.out_channels) >= 16]
    assert layers
    for layer in layers:
        ranks = [_rank(F) for F in layer.functional_matrix("t0")]
        if function == "rshift":
            assert ranks == [p] * 8
        elif function == "power":
            assert max(ranks) <= p and min(ranks) >= 2
        elif function == "linear":
            assert ranks == [1] * 8
        elif min(layer.in_channels, layer.out_channels) >= 32:  # cos: more than p
            assert min(ranks) > p, ranks
        else:  # cos on 16-channel layers: rank is capped by 16 and lands around 9 to 15, still above power's
            assert max(ranks) > p and min(ranks) >= p - 2, ranks


def test_functional_matrix_closed_form():
    """F_y recomputed entry by entry from the definitions of method.md §3."""
    torch.manual_seed(0)
    a, b = torch.randn(1, 5), torch.randn(1, 4)
    alpha, omega = torch.randn(1, 3), torch.rand(1, 3) * 2
    p = 3
    expected = {
        "cos": sum(alpha[0, i] * torch.cos(omega[0, i] * torch.outer(a[0], b[0])) for i in range(p)) / p,
        "rshift": sum(alpha[0, i] * torch.outer(a[0].roll(i), b[0].roll(i)) for i in range(p)) / p,
        "power": sum(alpha[0, i] * torch.outer(a[0].tanh(), b[0].tanh()) ** (i + 1) for i in range(p)) / p,
    }
    for name, value in expected.items():
        got = funlora_peft.get_function(name).compute(a, b, alpha, omega)[0]
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)
    got = funlora_peft.get_function("linear").compute(a, b, alpha[:, :1])[0]
    torch.testing.assert_close(got, alpha[0, 0] * torch.outer(a[0], b[0]))


# ---------------------------------------------------------------------------------------------------------------------
# 5. merge / unmerge / disable


def test_merge_unmerge_restores_weights_and_disable_gives_base(unet_name, function):
    model = two_task_model(unet_name, function).double()
    unet = model.base_model.model
    x_t, t = inputs64(unet, batch_size=4)
    weights = {k: v.clone() for k, v in unet.state_dict().items() if "funlora_" not in k}
    with torch.no_grad():
        routed = model(x_t, t, class_labels=3).sample
        model.base_model.merge_adapter(class_label=3)
        assert any(not torch.equal(unet.state_dict()[k], v) for k, v in weights.items())
        merged = model(x_t, t, class_labels=3).sample
        with pytest.raises(ValueError, match="unmerge_adapter"):
            model(x_t, t, class_labels=torch.tensor([3, 0, 3, 3]))
        model.base_model.unmerge_adapter()
    torch.testing.assert_close(merged, routed, rtol=0, atol=1e-10)
    for k, v in unet.state_dict().items():
        if "funlora_" not in k:
            assert torch.equal(v, weights[k]), k

    plain = make_unet(unet_name).requires_grad_(False).double()
    with torch.no_grad():
        expected = plain(x_t, t).sample
        with model.disable_adapter():
            assert torch.equal(model(x_t, t).sample, expected)
            assert torch.equal(model(x_t, t, class_labels=0).sample, expected)


def test_merge_and_unload_while_another_class_is_merged_starts_from_w0(unet_name):
    model = two_task_model(unet_name, "rshift").double()
    x_t, t = inputs64(model.base_model.model, batch_size=2)
    with torch.no_grad():
        routed = model(x_t, t, class_labels=2).sample
        model.base_model.merge_adapter(class_label=0)  # W_0 of class 0 in the convs: class 2 is built from W0
        unet = model.base_model.merge_and_unload(class_label=2)
        torch.testing.assert_close(unet(x_t, t).sample, routed, rtol=0, atol=1e-10)


def test_unload_returns_untouched_base(unet_name):
    model = two_task_model(unet_name, "cos")
    x_t, t = make_inputs(model.base_model.model, batch_size=2)
    unet = model.unload()
    assert not funlora_layers(unet)
    with torch.no_grad():
        assert torch.equal(unet(x_t, t).sample, make_unet(unet_name).requires_grad_(False)(x_t, t).sample)


# ---------------------------------------------------------------------------------------------------------------------
# 6. save / load in a fresh process


LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    import funlora_peft
    from conftest import make_unet, make_inputs
    from peft import PeftConfig, PeftModel
    from safetensors.torch import save_file
    config = PeftConfig.from_pretrained({task0!r})
    assert type(config).__name__ == "FunLoRAConfig", type(config)
    unet = make_unet({unet_name!r})
    m = PeftModel.from_pretrained(unet, {task0!r}, adapter_name="task_0")
    m.load_adapter({task1!r}, adapter_name="task_1")
    x_t, t = make_inputs(unet, batch_size=6)
    with torch.no_grad():
        out = m(x_t, t, class_labels=torch.tensor([0, 3, 2, 1, 5, 0])).sample
    save_file({{"out": out}}, {result!r})
    """
)


def test_save_load_fresh_process(unet_name, function, tmp_path):
    model = two_task_model(unet_name, function)
    x_t, t = make_inputs(model.base_model.model, batch_size=6)
    with torch.no_grad():
        expected = model(x_t, t, class_labels=MIXED).sample
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert "task_0/adapter_model.safetensors" in written and "task_1/adapter_model.safetensors" in written
    assert not [w for w in written if w.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    saved = json.loads((tmp_path / "task_1" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FUNLORA" and saved["class_ids"] == [2, 3, 5] and saved["function"] == function

    result = tmp_path / "out.safetensors"
    script = LOAD_SCRIPT.format(
        tests=os.path.dirname(__file__),
        task0=str(tmp_path / "task_0"),
        task1=str(tmp_path / "task_1"),
        unet_name=unet_name,
        result=str(result),
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert torch.equal(load_file(result)["out"], expected)


def test_peft_config_from_pretrained_returns_funlora_config(tmp_path):
    model = two_task_model("attn", "power")
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    config = PeftConfig.from_pretrained(tmp_path / "task_0")
    assert isinstance(config, FunLoRAConfig)
    assert config.class_ids == [0, 1] and config.function == "power" and config.num_functions == 10


# ---------------------------------------------------------------------------------------------------------------------
# 7. gradient checkpointing


def test_gradient_checkpointing_gives_same_gradients(unet_name):
    grads = []
    for checkpointing in (False, True):
        model = two_task_model(unet_name, "cos").double()
        model.set_adapter("task_1")
        unet = model.base_model.model
        if checkpointing:
            unet.enable_gradient_checkpointing()
        model.train()
        x_t, t = inputs64(unet, batch_size=6)
        loss = model(x_t, t, class_labels=torch.tensor([2, 3, 5, 0, 1, 2])).sample.pow(2).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("function", ["cos", "rshift"])
def test_mixed_batch_gradients_equal_per_class_gradients(unet_name, function):
    """Backbone, bias, adapter and input gradients of a mixed batch = the sum over its single-class sub-batches."""
    # In float64 the two summation orders agree to ~1e-15 relative; float32 round-off would need a tolerance fitted
    # to the machine.
    model = two_task_model(unet_name, function).double()
    for param in model.parameters():  # as in task 0: backbone and adapters all trainable
        param.requires_grad_(True)
    model.train()
    x_t, t = make_inputs(model.base_model.model, batch_size=6)
    x_t, t = x_t.double(), t.double()

    def gradients(batches):
        model.zero_grad(set_to_none=True)
        inputs = []
        for idx in batches:
            x = x_t[idx].clone().requires_grad_(True)
            model(x, t[idx], class_labels=MIXED[idx]).sample.pow(2).sum().backward()
            inputs.append((idx, x.grad))
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        x_grad = torch.zeros_like(x_t)
        for idx, g in inputs:
            x_grad[idx] = g
        return grads, x_grad

    mixed, mixed_x = gradients([torch.arange(6)])
    per_class, per_class_x = gradients([(MIXED == c).nonzero().flatten() for c in MIXED.unique()])
    assert mixed.keys() == per_class.keys() and any("base_layer.weight" in n for n in mixed)
    for name in mixed:
        torch.testing.assert_close(
            mixed[name], per_class[name], rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}"
        )
    torch.testing.assert_close(mixed_x, per_class_x, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# 8. dtype and device


def test_bf16_autocast_and_fp32_adapters(unet_name):
    model = two_task_model(unet_name, "cos")
    model.set_adapter("task_1")
    x_t, t = make_inputs(model.base_model.model, batch_size=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x_t, t, class_labels=MIXED).sample
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    adapter_params = [(n, p) for n, p in model.named_parameters() if "funlora_" in n]
    assert all(p.dtype == torch.float32 for _, p in adapter_params)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in adapter_params if ".task_1" in n)


def test_bf16_base_keeps_fp32_adapters(unet_name):
    unet = make_unet(unet_name).to(torch.bfloat16)
    model = get_peft_model(unet, FunLoRAConfig(class_ids=[0, 1], function="rshift"), "task_0")
    randomize_adapters(model)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "funlora_" in n)
    x_t, t = make_inputs(unet, batch_size=2)
    with torch.no_grad():
        out = model(x_t.bfloat16(), t, class_labels=torch.tensor([0, 1])).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_adapters_follow_to(unet_name):
    model = two_task_model(unet_name, "cos")
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for n, p in model.named_parameters() if "funlora_" in n)
    model.to("meta")
    assert all(p.device.type == "meta" for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Numerics: every family stays finite and trains for a few hundred steps at adapter learning rates


@pytest.mark.parametrize("function", sorted(FAMILIES))
def test_families_stay_finite_for_hundreds_of_steps(function):
    unet = make_unet("attn")
    model = get_peft_model(
        unet, FunLoRAConfig(class_ids=[0, 1], function=function, num_functions=FAMILIES[function]), "task_0"
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 1, 8, 8, generator=generator)
    t = torch.rand(4, generator=generator) * 1000
    labels = torch.tensor([0, 1, 0, 1])
    target = torch.randn(4, 1, 8, 8, generator=generator) * 2
    losses = []
    model.train()
    for _ in range(300):
        loss = (model(x_t, t, class_labels=labels).sample - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in params)
    assert all(map(lambda v: v == v and v < float("inf"), losses))
    assert losses[-1] < 0.9 * losses[0], (losses[0], losses[-1])


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing changed


def test_unknown_label_lists_known_ids():
    model = two_task_model("attn", "rshift")
    x_t, t = make_inputs(model.base_model.model, batch_size=2)
    with pytest.raises(ValueError, match=r"\[7\].*Known class ids: \[0, 1, 2, 3, 5\]"):
        model(x_t, t, class_labels=torch.tensor([0, 7]))


def test_class_claimed_twice_is_refused_and_model_unchanged():
    model = two_task_model("attn", "rshift")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"\[3\] are already owned by adapter 'task_1'"):
        model.add_adapter("task_2", FunLoRAConfig(class_ids=[3, 4], function="rshift"))
    assert list(model.peft_config) == ["task_0", "task_1"]
    assert model.state_dict().keys() == state.keys()


def test_missing_labels_says_how_to_get_base_output():
    model = two_task_model("attn", "rshift")
    x_t, t = make_inputs(model.base_model.model, batch_size=2)
    with pytest.raises(ValueError, match=r"`class_labels` is missing.*disable_adapter"):
        model(x_t, t)


@pytest.mark.parametrize(
    "labels, error, match",
    [
        (torch.tensor([0.0, 1.0]), TypeError, "integer class ids, got dtype torch.float32"),
        (torch.tensor([[0], [1]]), ValueError, r"shape \(2,\).*got \(2, 1\)"),
        (torch.tensor([0, 1, 1]), ValueError, r"shape \(2,\).*got \(3,\)"),
        ("0", TypeError, "tensor of shape"),
        ([0.5, 1], TypeError, "integer class ids"),
    ],
)
def test_bad_label_shape_or_dtype(labels, error, match):
    model = two_task_model("attn", "rshift")
    x_t, t = make_inputs(model.base_model.model, batch_size=2)
    with pytest.raises(error, match=match):
        model(x_t, t, class_labels=labels)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(class_ids=[0], function="sine"), ValueError, r"Unknown `function` 'sine'.*\['cos', 'linear', 'power'"),
        (dict(class_ids=[0], num_functions=0), ValueError, "`num_functions` must be >= 1, got 0"),
        (dict(class_ids=[0], function="linear", num_functions=10), ValueError, "must be 1, got 10"),
        (dict(class_ids=[0, 0]), ValueError, r"distinct, but \[0\]"),
        (dict(class_ids=[-1]), ValueError, "non-negative"),
        (dict(), ValueError, "`class_ids` is required"),
        (dict(class_ids=[0], init_a_std=0.0), ValueError, "`init_a_std` must be > 0"),
    ],
)
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        FunLoRAConfig(**kwargs)


def test_target_modules_matching_no_conv():
    unet = make_unet("attn")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError, match=r"matches no nn.Conv2d.*convs are named e.g."):
        get_peft_model(unet, FunLoRAConfig(class_ids=[0], target_modules=["not_a_layer"]), "task_0")
    with pytest.raises(ValueError, match=r"cannot adapt: \['time_embedding.linear_1 \(Linear\)'\]"):
        get_peft_model(unet, FunLoRAConfig(class_ids=[0], target_modules=["time_embedding.linear_1", "conv_in"]))
    assert not funlora_layers(unet)
    assert unet.state_dict().keys() == before.keys()


def test_target_and_exclude_modules():
    unet = make_unet("shortcut")
    config = FunLoRAConfig(class_ids=[0], target_modules=r".*resnets\.\d+\.conv\d", exclude_modules=["conv2"])
    model = get_peft_model(unet, config, "task_0")
    names = [n for n, m in model.base_model.model.named_modules() if isinstance(m, FunLoRALayer)]
    assert names and all(n.endswith("conv1") for n in names)


def test_default_targets_every_conv():
    unet = make_unet("shortcut")
    convs = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)]
    model = get_peft_model(unet, FunLoRAConfig(class_ids=[0, 1]), "task_0")
    adapted = [n for n, m in model.base_model.model.named_modules() if isinstance(m, FunLoRALayer)]
    assert adapted == convs
    assert any(n.endswith("conv_shortcut") for n in adapted)


def _save_adapter(tmp_path, unet_name, class_ids=(0, 1), name="task_0"):
    model = get_peft_model(make_unet(unet_name), FunLoRAConfig(class_ids=list(class_ids), function="cos"), name)
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "src", save_embedding_layers=False)
    return tmp_path / "src" / name if name != "default" else tmp_path / "src"


def test_loading_adapter_for_differently_shaped_unet_is_refused(tmp_path):
    # Same module names, other widths: the attn UNet with 24/48 channels.
    path = _save_adapter(tmp_path, "attn")
    wide = dict(UNET_CONFIGS["attn"], block_out_channels=(24, 48))
    torch.manual_seed(0)
    unet = UNet2DModel(**wide)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 'conv_in': tensor funlora_a has shape \(\d+, 16\).*\(\d+, 24\)"):
        PeftModel.from_pretrained(unet, path, adapter_name="task_0")
    assert not funlora_layers(unet) and not hasattr(unet, "peft_config")
    assert unet.state_dict().keys() == before.keys()

    # load_adapter into an existing model: the failed adapter is gone, the others untouched.
    model = get_peft_model(unet, FunLoRAConfig(class_ids=[7], function="cos"), "task_a")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="saved for a differently shaped UNet.*left as it was"):
        model.load_adapter(path, adapter_name="task_0")
    assert list(model.peft_config) == ["task_a"]
    assert model.state_dict().keys() == state.keys()
    x_t, t = make_inputs(unet, batch_size=2)
    with torch.no_grad():
        model(x_t, t, class_labels=7)


def test_tampered_adapter_files_are_refused(tmp_path):
    path = _save_adapter(tmp_path, "attn")
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("funlora_alpha"))
    cases = {
        "nan": ({**tensors, key: torch.full_like(tensors[key], float("nan"))}, "NaN or infinite"),
        "renamed": (
            {**{k: v for k, v in tensors.items() if k != key}, key.replace("conv_in", "conv_nope"): tensors[key]},
            "does not map to a FunLoRA tensor",
        ),
        "missing": ({k: v for k, v in tensors.items() if k != key}, "lacks 1 tensors"),
        "int": ({**tensors, key: tensors[key].to(torch.int64)}, "dtype torch.int64"),
    }
    for case, (state, match) in cases.items():
        save_file(state, path / "adapter_model.safetensors")
        unet = make_unet("attn")
        with pytest.raises(ValueError, match=match):
            PeftModel.from_pretrained(unet, path, adapter_name="task_0")
        assert not funlora_layers(unet), case


def test_a_task_on_some_layers_is_unaffected_by_other_loaded_tasks(unet_name):
    """A task that adapts a subset of the convs (e.g. after layer selection) gives bit-identical outputs whether or
    not a task adapting every conv is loaded beside it: on the layers it does not adapt its classes see plain convs."""
    targets = [n for n, m in make_unet(unet_name).named_modules() if isinstance(m, torch.nn.Conv2d)][2:5]
    alone = get_peft_model(make_unet(unet_name), FunLoRAConfig(class_ids=[2, 3], target_modules=targets, init_seed=1))
    both = get_peft_model(make_unet(unet_name), FunLoRAConfig(class_ids=[0, 1], init_seed=0), adapter_name="task_0")
    both.add_adapter("default", FunLoRAConfig(class_ids=[2, 3], target_modules=targets, init_seed=1))
    with torch.no_grad():
        for model in (alone, both):
            for name, param in model.named_parameters():
                if "funlora_alpha" in name:
                    param.fill_(0.7)
        for batch_size in (2, 3, 16):  # mixed batches: chunked and whole-batch convs differ in the last bits
            x_t, t = make_inputs(alone.base_model.model, batch_size=batch_size)
            labels = torch.tensor([3, 2] * batch_size)[:batch_size]
            assert torch.equal(alone(x_t, t, class_labels=labels).sample, both(x_t, t, class_labels=labels).sample)
        pair = torch.tensor([2, 2])  # a single-class batch
        assert torch.equal(
            alone(x_t[:2], t[:2], class_labels=pair).sample, both(x_t[:2], t[:2], class_labels=pair).sample
        )


# ---------------------------------------------------------------------------------------------------------------------
# Cost: one convolution per conv whatever the classes, class weights built once for sampling, torch.compile


class _CountOps(TorchDispatchMode):
    """Counts the aten ops run under it, by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _conv_calls(model, x_t, t, **kwargs) -> tuple[int, int]:
    """(convolutions in the forward, convolution backwards) of one training step."""
    with _CountOps() as counter:
        out = model(x_t, t, **kwargs).sample
        forward = counter.ops["convolution"]
        out.square().mean().backward()
    return forward, counter.ops["convolution_backward"]


@pytest.mark.parametrize("labels", [[1] * 6, [0, 1, 0, 1, 0, 1], [0, 3, 2, 1, 5, 0], [5, 5, 5, 0, 2, 3]])
def test_a_batch_of_any_classes_costs_one_convolution_per_conv(unet_name, labels):
    model = two_task_model(unet_name, "cos")
    for param in model.parameters():
        param.requires_grad_(True)
    x_t, t = make_inputs(model.base_model.model, batch_size=6)
    with model.disable_adapter():
        bare = _conv_calls(model, x_t, t)
    assert _conv_calls(model, x_t, t, class_labels=torch.tensor(labels)) == bare


def test_unbalanced_and_shuffled_batches_give_the_per_sample_outputs(unet_name):
    """Any order and any class counts (padded in the layout) give each sample its own class's output (float64)."""
    model = two_task_model(unet_name, "cos").double()
    labels = torch.tensor([5, 0, 5, 5, 2, 0, 5, 3])
    x_t, t = make_inputs(model.base_model.model, batch_size=8)
    x_t, t = x_t.double(), t.double()
    with torch.no_grad():
        mixed = model(x_t, t, class_labels=labels).sample
        for i in range(len(labels)):
            alone = model(x_t[i : i + 1], t[i : i + 1], class_labels=labels[i : i + 1]).sample
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-10, atol=1e-12)


def test_sampling_builds_the_class_weights_once_and_a_parameter_update_rebuilds_them(unet_name, monkeypatch):
    model = two_task_model(unet_name, "cos")
    layers = funlora_layers(model)
    builds = []
    original = FunLoRALayer._class_scales
    monkeypatch.setattr(FunLoRALayer, "_class_scales", lambda self, plan: builds.append(self) or original(self, plan))
    x_t, t = make_inputs(model.base_model.model, batch_size=6)
    with torch.no_grad():
        first = model(x_t, t, class_labels=MIXED).sample
        assert len(builds) == len(layers)  # once per layer
        for _ in range(3):  # the steps of a sampling loop
            again = model(x_t, t, class_labels=MIXED).sample
        assert len(builds) == len(layers) and torch.equal(first, again)
        # a single-class call of the pipeline in between (merged, its own routing plan) restores W0 itself and
        # leaves the mixed batch's weights valid: no rebuild
        model.base_model.merge_adapter(class_label=3)
        model(x_t, t, class_labels=torch.full((6,), 3))
        model.base_model.unmerge_adapter()
        assert torch.equal(model(x_t, t, class_labels=MIXED).sample, first) and len(builds) == len(layers)
        # released (as the pipeline does when its call ends), they are built again by the next forward
        model.base_model.release_class_weights()
        assert all(layer._weight_cache is None for layer in layers)
        assert torch.equal(model(x_t, t, class_labels=MIXED).sample, first) and len(builds) == 2 * len(layers)
    # a training step changes the adapters in place: its forward frees the stale weights, and the next sampling call
    # rebuilds them, never a stale weight
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if "funlora_" in n], lr=0.5)
    model(x_t, t, class_labels=MIXED).sample.square().mean().backward()
    assert all(layer._weight_cache is None for layer in layers)
    optimizer.step()
    builds.clear()
    with torch.no_grad():
        updated = model(x_t, t, class_labels=MIXED).sample
    assert len(builds) == len(layers) and not torch.equal(updated, first)
    fresh = two_task_model(unet_name, "cos")
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(updated, fresh(x_t, t, class_labels=MIXED).sample)
    # so does loading other tensors into the same model
    model.load_state_dict(two_task_model(unet_name, "cos").state_dict())
    with torch.no_grad():
        assert torch.equal(model(x_t, t, class_labels=MIXED).sample, first)


@pytest.mark.parametrize("function", ["cos", "linear"])
def test_training_keeps_the_factors_for_backward_not_the_class_scales(unet_name, function):
    """A (classes, out, in) scale tensor per conv weighs, for 10 classes, as much as the backbone: backward rebuilds
    it from the classes' factors instead of keeping it (nor the stacked weights)."""
    model = two_task_model(unet_name, function)
    x_t, t = make_inputs(model.base_model.model, batch_size=6)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x_t, t, class_labels=MIXED).sample.square().mean()
    classes = len(MIXED.unique())
    for layer in funlora_layers(model):
        out_channels, in_channels, *kernel = layer.get_base_layer().weight.shape
        assert (classes, out_channels, in_channels) not in saved, layer
        assert (classes * out_channels, in_channels, *kernel) not in saved, layer
    loss.backward()
    trained = [p for n, p in model.named_parameters() if p.requires_grad and "funlora_" in n]
    assert trained and all(p.grad is not None for p in trained)
    assert all(p.grad.abs().sum() > 0 for p in trained if p.shape[0] == 2)  # task_0's rows: both classes present


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(padding="same"),
        dict(padding="valid"),
        dict(padding=1, padding_mode="reflect"),
        dict(kernel_size=4, padding="same"),
    ],
)
def test_convs_with_any_padding_train_on_mixed_batches(conv_kwargs):
    """String paddings and padding modes go through the grouped convolution and its backward (float64)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, **{"kernel_size": 3, **conv_kwargs}, dtype=torch.float64)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    model = get_peft_model(Net(), FunLoRAConfig(class_ids=[0, 1, 2], init_alpha=0.3, init_seed=0), "task_0")
    x = torch.randn(5, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([2, 0, 1, 2, 0])
    out = model(x, class_labels=labels)
    out.square().sum().backward()
    for i in range(5):
        layer = model.base_model.model.conv
        weight = (
            layer.get_base_layer().weight
            * layer._class_scales(model.base_model.routing_plan([int(labels[i])], 1))[0][:, :, None, None]
        )
        conv = torch.nn.Conv2d(3, 4, **{"kernel_size": 3, **conv_kwargs}, dtype=torch.float64)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(layer.get_base_layer().bias)
            torch.testing.assert_close(out[i : i + 1], conv(x[i : i + 1].detach()), rtol=1e-10, atol=1e-12)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "conv_kwargs", [{"padding": 1}, {"padding": 0, "stride": 2}, {"padding": 2, "dilation": 2, "bias": False}]
)
def test_wide_low_resolution_convs_take_a_batched_matmul_with_the_same_results(conv_kwargs, monkeypatch):
    """On the CPU a conv with a large kernel per class (in * s * s >= 2304) and few output positions per class takes
    one batched matmul over the classes instead of the grouped convolution (`_uses_matmul`). Its outputs, every
    gradient (input, W0, bias, adapter tensors) and the sampling outputs equal the grouped convolution's (float64)."""
    from funlora_peft.tuner import layer as layer_module

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(256, 8, 3, **conv_kwargs, dtype=torch.float64)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    model = get_peft_model(Net(), FunLoRAConfig(class_ids=[0, 1, 2], init_alpha=0.3, init_seed=0), "task_0")
    for param in model.parameters():
        param.requires_grad_(True)
    x = torch.randn(5, 256, 4, 6, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 2, 0])  # 3 classes, 2 slots each: at most 2 * 24 positions per class
    columns = []
    unfold = layer_module._class_columns
    monkeypatch.setattr(layer_module, "_class_columns", lambda *args: columns.append(1) or unfold(*args))

    def run():
        model.zero_grad()
        x_in = x.clone().requires_grad_(True)
        out = model(x_in, class_labels=labels)
        out.square().sum().backward()
        grads = {name: param.grad.clone() for name, param in model.named_parameters()}
        with torch.no_grad():
            sampled = model(x, class_labels=labels)
        model.base_model.release_class_weights()
        return [out.detach(), x_in.grad, sampled, *grads.values()]

    matmul = run()
    assert len(columns) == 3  # forward, backward (W0's gradient), sampling
    monkeypatch.setattr(layer_module, "_MATMUL_MAX_POSITIONS", 0)  # the grouped convolution everywhere
    grouped = run()
    assert len(columns) == 3
    assert len(matmul) == len(grouped)
    for got, expected in zip(matmul, grouped):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_compiled_model_matches_eager_and_does_not_recompile_for_the_same_classes():
    """torch.compile traces the routed UNet (the routing runs eagerly, `torch.compiler.disable`) for training and
    sampling; the AOTAutograd backend exercises the custom autograd functions. Inductor gives the same graphs."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = two_task_model("attn", "cos").double()  # float64: traced and eager agree to rounding
    for param in model.parameters():
        param.requires_grad_(True)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    x_t, t = inputs64(model.base_model.model, batch_size=6)
    eager = model(x_t, t, class_labels=MIXED).sample
    eager.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = compiled(x_t, t, class_labels=MIXED).sample
    out.square().mean().backward()
    torch.testing.assert_close(out, eager, rtol=1e-9, atol=1e-12)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], rtol=1e-9, atol=1e-12)
    frames = counter.frame_count
    # another step with the same classes and counts (other samples, times and labels' order) compiles nothing new
    x_2, t_2 = inputs64(model.base_model.model, batch_size=6, seed=7)
    compiled(x_2, t_2, class_labels=MIXED[torch.randperm(6)]).sample.square().mean().backward()
    assert counter.frame_count == frames
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(x_t, t, class_labels=MIXED).sample,
            model(x_t, t, class_labels=MIXED).sample,
            rtol=1e-9,
            atol=1e-12,
        )


def test_class_scales_hash_without_reading_their_fields():
    """torch 2.11's dynamo hashes a `ClassScales` built inside the traced forward before its fields are set (it failed
    there with "'ClassScales' object has no attribute 'layout'"): they hash by identity, never by their fields."""
    from funlora_peft.tuner.layer import ClassScales

    unset = object.__new__(ClassScales)
    assert hash(unset) == object.__hash__(unset)


@pytest.mark.parametrize("function", ["cos", "linear"])
def test_a_funlora_conv_compiles_into_one_graph_forward_and_backward(function):
    """`fullgraph=True` fails on any graph break: the layer's routed convolution and its custom backward trace whole
    (the eager backward rebuilds the class scales with `torch.autograd.grad`, which dynamo cannot trace)."""
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    config = FunLoRAConfig(class_ids=[0, 1, 2], function=function, num_functions=FAMILIES[function], init_alpha=0.3)
    model = get_peft_model(torch.nn.Sequential(conv), config, "task_0")
    layer = funlora_layers(model)[0]
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 2, 0, 1])
    layer._routing = model.base_model.routing_plan(labels, len(labels))
    eager = layer(x)
    eager.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)
    assert grads
    for name, param in layer.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# What a PEFT user expects of a tuner


def trainable_adapters(model) -> set[str]:
    """The adapter names owning a parameter that requires grad."""
    names = set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert "funlora_" in name, f"{name} of the backbone is trainable"
            names.add(name.split(".")[-1])
    return names


def test_loaded_or_inference_mode_adapters_stay_frozen(tmp_path):
    model = two_task_model("attn", "cos")
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    loaded = PeftModel.from_pretrained(make_unet("attn"), tmp_path / "task_0", adapter_name="task_0")
    assert trainable_adapters(loaded) == set()  # is_trainable=False, PEFT's default
    loaded.load_adapter(tmp_path / "task_1", "task_1")
    loaded.add_adapter("task_2", FunLoRAConfig(class_ids=[6]))
    loaded.set_adapter("task_2")  # as with PEFT's own tuners, the adapter to train is made active
    # Old tasks stay frozen when a new one is added: an optimizer over the trainable parameters cannot touch them.
    assert trainable_adapters(loaded) == {"task_2"}
    again = PeftModel.from_pretrained(make_unet("attn"), tmp_path / "task_0", "task_0", is_trainable=True)
    assert trainable_adapters(again) == {"task_0"}
    frozen = get_peft_model(make_unet("attn"), FunLoRAConfig(class_ids=[0], inference_mode=True), "task_0")
    assert trainable_adapters(frozen) == set()


def test_reusing_a_config_object_cannot_take_over_its_classes():
    config = FunLoRAConfig(class_ids=[0, 1])
    model = get_peft_model(make_unet("attn"), config, "task_0")
    with pytest.raises(ValueError, match=r"Class ids \[0, 1\] are already owned by adapter 'task_0'"):
        model.add_adapter("task_1", config)
    assert list(model.peft_config) == ["task_0"] and not any(".task_1" in n for n, _ in model.named_parameters())


def test_inject_adapter_in_model_once_per_adapter_routes_both():
    unet = make_unet("attn").double()  # float64: a batch of 3 and three of 1 agree to ~1e-15
    inject_adapter_in_model(FunLoRAConfig(class_ids=[0, 1], init_alpha=0.3, init_seed=1), unet, "task_0")
    inject_adapter_in_model(FunLoRAConfig(class_ids=[2], init_alpha=0.3, init_seed=2), unet, "task_1")
    x_t, t = make_inputs(unet, batch_size=3)
    x_t, t = x_t.double(), t.double()
    with torch.no_grad():
        mixed = unet(x_t, t, class_labels=torch.tensor([0, 2, 1])).sample
        alone = [unet(x_t[i : i + 1], t[i : i + 1], class_labels=[c]).sample for i, c in enumerate([0, 2, 1])]
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match=r"Class ids \[2\] are already owned by adapter 'task_1'"):
        inject_adapter_in_model(FunLoRAConfig(class_ids=[2]), unet, "task_2")


class Denoiser(torch.nn.Module):
    """A model wrapping a UNet whose forward names its inputs otherwise than diffusers does."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, noisy_images, times):
        return self.unet(noisy_images, times).sample


def test_routing_finds_the_batch_under_any_keyword():
    model = get_peft_model(Denoiser(make_unet("attn")), FunLoRAConfig(class_ids=[0, 1], init_alpha=0.3), "task_0")
    x_t, t = make_inputs(model.base_model.model.unet, batch_size=2)
    with torch.no_grad():
        by_keyword = model(noisy_images=x_t, times=t, class_labels=[1, 0])
        by_position = model(x_t, t, class_labels=[1, 0])
    assert torch.equal(by_keyword, by_position)


def test_a_model_whose_adapters_were_all_deleted_runs_as_the_base_model():
    model = two_task_model("attn", "cos")
    base = make_unet("attn")
    x_t, t = make_inputs(base, batch_size=2)
    for name in ("task_0", "task_1"):
        model.delete_adapter(name)
    assert model.peft_config == {} and not any("funlora_" in n for n, _ in model.named_parameters())
    # PeftModel.forward itself reads the deleted active adapter's config (a KeyError for every PEFT tuner, LoRA too);
    # the tuner and the UNet it wraps run as the base model.
    with torch.no_grad():
        expected = base(x_t, t).sample
        assert torch.equal(model.base_model(x_t, t).sample, expected)
        assert torch.equal(model.base_model.model(x_t, t).sample, expected)


def test_autocast_adapter_dtype_false_keeps_the_base_dtype():
    unet = make_unet("attn").to(torch.bfloat16)
    model = get_peft_model(unet, FunLoRAConfig(class_ids=[0]), "task_0", autocast_adapter_dtype=False)
    assert {p.dtype for n, p in model.named_parameters() if "funlora_" in n} == {torch.bfloat16}
    upcast = get_peft_model(make_unet("attn").to(torch.bfloat16), FunLoRAConfig(class_ids=[0]), "task_0")
    assert {p.dtype for n, p in upcast.named_parameters() if "funlora_" in n} == {torch.float32}


def test_layers_expose_in_and_out_features():
    model = two_task_model("attn", "cos")
    for layer in funlora_layers(model):
        conv = layer.get_base_layer()
        assert (layer.in_features, layer.out_features) == (conv.in_channels, conv.out_channels)


def test_model_status_names_the_type_and_mixed_models_are_refused():
    model = two_task_model("attn", "cos")
    status = get_model_status(model)
    assert status.peft_types == {"task_0": "FUNLORA", "task_1": "FUNLORA"}
    assert status.available_adapters == ["task_0", "task_1"]
    assert str(model.peft_config["task_0"].peft_type) == "PeftType.FUNLORA"  # as PEFT's own types print
    # PEFT's list of types a PeftMixedModel accepts is closed (LoRA and its kin): PEFT's ValueError, not a crash.
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        get_peft_model(make_unet("attn"), FunLoRAConfig(class_ids=[0]), mixed=True)


def test_a_second_get_peft_model_on_the_same_unet_routes_both():
    unet = make_unet("attn").double()
    first = get_peft_model(unet, FunLoRAConfig(class_ids=[0, 1], init_alpha=0.3, init_seed=1), "task_0")
    second = get_peft_model(unet, FunLoRAConfig(class_ids=[2], init_alpha=0.3, init_seed=2), "task_1")
    x_t, t = inputs64(unet, batch_size=2)
    with torch.no_grad():
        both = [model(x_t, t, class_labels=[0, 2]).sample for model in (first, second)]
        alone = [unet(x_t[i : i + 1], t[i : i + 1], class_labels=[c]).sample for i, c in enumerate([0, 2])]
    assert torch.equal(both[0], both[1])
    torch.testing.assert_close(both[0], torch.cat(alone), rtol=0, atol=1e-10)
