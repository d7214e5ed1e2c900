"""funlora_peft.diagnostics and `funlora inspect`: the rank of F_y per layer and alpha / omega over classes."""

import json

import pytest
import torch
from conftest import TASKS, make_unet
from peft import get_peft_model
from PIL import Image

from funlora_peft import FunLoRAConfig, FunLoRALayer, cli
from funlora_peft.continual.importance import unet_order
from funlora_peft.diagnostics import adapter_diagnostics
from funlora_peft.tuner.model import base_model_name


def _model(function: str, num_functions: int, alpha=None):
    config = FunLoRAConfig(class_ids=[0, 1, 2], function=function, num_functions=num_functions, init_seed=3)
    model = get_peft_model(make_unet("attn"), config, adapter_name="task_0")
    if alpha is not None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".funlora_alpha." in name:
                    parameter.copy_(alpha.expand_as(parameter))
    return model


def test_rank_of_each_family_is_what_its_construction_allows():
    p = 4
    ones = torch.ones(p)
    # alpha = 0 (the identity initialisation): F_y = 0, rank 0 in every layer.
    assert {r for layer in adapter_diagnostics(_model("cos", p)) for r in layer.rank} == {0}
    # linear: F_y = alpha a b^T, rank 1.
    assert {r for layer in adapter_diagnostics(_model("linear", 1, torch.ones(1))) for r in layer.rank} == {1}
    # rshift: p shifted outer products of generic vectors, rank exactly p where both sides have p channels or more.
    for layer in adapter_diagnostics(_model("rshift", p, ones)):
        assert layer.rank == [min(p, *layer.shape)] * 3, layer.name
    # cos with the default frequencies: well above p in the wide layers (the family's point).
    wide = [layer for layer in adapter_diagnostics(_model("cos", p, ones)) if min(layer.shape) >= 16]
    assert wide and all(min(layer.rank) > p for layer in wide)


def test_layers_in_unet_order_with_the_statistics_over_classes():
    model = _model("cos", 3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".funlora_alpha." in name:
                parameter.copy_(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [2.0, 2.0, 2.0]]))
    layers = adapter_diagnostics(model)
    names = [base_model_name(name) for name, m in model.named_modules() if isinstance(m, FunLoRALayer)]
    assert [layer.name for layer in layers] == unet_order(names)
    layer = layers[0]
    assert layer.function == "cos" and layer.num_functions == 3 and layer.class_ids == [0, 1, 2]
    assert layer.alpha_mean == pytest.approx([2.0, 2.0, 2.0], abs=0) and layer.alpha_std == pytest.approx([1, 0, 1])
    # omega_i = init_omega * i for every class: the mean is the initial frequency, the spread 0.
    assert layer.omega_mean == [1.0, 2.0, 3.0] and layer.omega_std == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"adapter_names=\['task_9'\]: \['task_9'\] adapt no layer"):
        adapter_diagnostics(model, ["task_9"])


def test_inspect_writes_the_plots_and_the_numbers_of_a_run_folder(run_folder, tmp_path, capsys):
    out = tmp_path / "plots"
    assert cli.main(["inspect", str(run_folder), "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("rank.png", "alpha_omega.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100
    layers = json.loads((out / "diagnostics.json").read_text())
    # Every class of the run's three tasks in every layer (the fixture adapts every conv), ranks within the shape.
    assert {tuple(layer["class_ids"]) for layer in layers} == {tuple(c for ids in TASKS.values() for c in ids)}
    assert all(0 < r <= min(layer["shape"]) for layer in layers for r in layer["rank"])
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(rows) == len(layers) + 1 and "rank of F_y" in rows[0]  # the header and a row per layer
    # --tasks restricts the classes counted.
    assert cli.main(["inspect", str(run_folder), "--output_dir", str(out), "--tasks", "task_1"]) == 0
    assert {tuple(layer["class_ids"]) for layer in json.loads((out / "diagnostics.json").read_text())} == {(2, 3)}


def test_inspect_refuses_a_missing_or_file_output_dir(run_folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["inspect", str(run_folder)])
    assert "--output_dir is required" in capsys.readouterr().err
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["inspect", str(run_folder), "--output_dir", str(file)])
    assert "is a file; name a folder" in capsys.readouterr().err and file.read_text() == "x"
