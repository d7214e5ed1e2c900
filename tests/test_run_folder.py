"""The run folder: `save_run` writes it, `FunLoRAPipeline.from_pretrained` reads it back, and anything changed in it
is refused before the UNet is touched."""

import json

import pytest
import torch
from conftest import CLASS_NAMES, TASKS, load_pipeline, make_run, make_unet
from safetensors.torch import load_file, save_file

from funlora_peft import FunLoRALayer
from funlora_peft.run_folder import attach_tasks, read_index, save_run, write_folder_atomic, write_index


def _tamper_and_expect(folder, match):
    unet = make_unet("attn")
    with pytest.raises(ValueError, match=match):
        attach_tasks(unet, folder)
    assert not any(isinstance(m, FunLoRALayer) for m in unet.modules()), "the UNet must be left as it was"


def test_changed_byte_is_refused(run_folder):
    path = run_folder / "task_1" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    _tamper_and_expect(run_folder, "sha256 .* does not match")


def _rewrite(folder, relpath, tensors):
    """Write new tensors and re-hash the index, so only the content check can catch the problem."""
    save_file(tensors, folder / relpath)
    index = read_index(folder)
    write_index(folder, index.tasks, index.class_names)


def test_renamed_tensor_shape_mismatch_and_nan_are_refused(run_folder):
    relpath = "task_1/adapter_model.safetensors"
    original = load_file(run_folder / relpath)
    key = next(k for k in original if k.endswith("conv_in.funlora_a"))
    renamed = {k.replace("conv_in", "conv_zz") if k == key else k: v for k, v in original.items()}
    _rewrite(run_folder, relpath, renamed)
    _tamper_and_expect(run_folder, "does not map to a FunLoRA tensor")
    _rewrite(run_folder, relpath, {**original, key: torch.zeros(2, 99)})
    _tamper_and_expect(run_folder, r"layer 'conv_in': tensor funlora_a has shape \(2, 99\).*\(2, 16\)")
    _rewrite(run_folder, relpath, {**original, key: torch.full_like(original[key], float("nan"))})
    _tamper_and_expect(run_folder, "NaN or infinite")


def test_bad_index_is_refused(run_folder):
    index_path = run_folder / "funlora.json"
    data = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**data, "format_version": 99}))
    _tamper_and_expect(run_folder, "unknown format_version 99")
    duplicated = dict(data)
    duplicated["tasks"] = [dict(t) for t in data["tasks"]]
    duplicated["tasks"][1]["class_ids"] = [2, 0]
    index_path.write_text(json.dumps(duplicated))
    _tamper_and_expect(run_folder, "class id 0 is claimed by both 'task_0' and 'task_1'")
    (run_folder / "funlora.json").unlink()
    _tamper_and_expect(run_folder, "funlora.json not found")


def test_save_run_then_from_pretrained_gives_the_same_model(tmp_path):

    model = make_run(tmp_path / "run")  # written with save_run
    index = read_index(tmp_path / "run")
    assert [(t.name, t.class_ids, t.function, t.num_functions) for t in index.tasks] == [
        (name, ids, "cos", 10) for name, ids in TASKS.items()
    ]
    assert index.class_names == CLASS_NAMES
    assert sorted(index.sha256) == sorted(  # every file: weights and configs
        ["backbone/diffusion_pytorch_model.safetensors", "backbone/config.json"]
        + [f"{n}/{f}" for n in TASKS for f in ("adapter_model.safetensors", "adapter_config.json")]
    )
    pipe = load_pipeline(tmp_path / "run")
    saved = {n: p for n, p in model.state_dict().items()}
    loaded = pipe.peft_model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    labels = torch.tensor([4, 0, 2, 1])
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4) * 1000
    with torch.no_grad():
        assert torch.equal(model(x, t, class_labels=labels).sample, pipe.unet(x, t, class_labels=labels).sample)


def test_save_run_writes_the_named_adapters_and_the_backbone_once(tmp_path):

    model = make_run(tmp_path / "run")
    backbone = (tmp_path / "run" / "backbone" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    task_0 = (tmp_path / "run" / "task_0" / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        model.base_model.model.conv_in.funlora_alpha["task_2"].add_(1.0)
    save_run(model, tmp_path / "run", ["task_2"])
    assert (tmp_path / "run" / "backbone" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == backbone
    assert (tmp_path / "run" / "task_0" / "adapter_model.safetensors").read_bytes() == task_0
    reloaded = load_file(tmp_path / "run" / "task_2" / "adapter_model.safetensors")
    assert torch.equal(
        reloaded["base_model.model.conv_in.funlora_alpha"], model.base_model.model.conv_in.funlora_alpha["task_2"]
    )
    load_pipeline(tmp_path / "run")  # the index was re-hashed
    with pytest.raises(ValueError, match=r"adapter_names \['task_9'\] are not adapters of the model"):
        save_run(model, tmp_path / "run", ["task_9"])
    with pytest.raises(TypeError, match="save_run: expected a model holding FunLoRA adapters"):
        save_run(make_unet("attn"), tmp_path / "other")


def test_a_writer_killed_part_way_leaves_nothing_the_next_write_keeps(tmp_path):
    # What a kill during the write of backbone/ leaves: a hidden temporary folder (and the old folder set aside).
    (tmp_path / "out").mkdir()
    for leftover in (".backbone.k3j_x9", ".backbone.old"):
        (tmp_path / "out" / leftover).mkdir()
        (tmp_path / "out" / leftover / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    write_folder_atomic(tmp_path / "out" / "backbone", lambda tmp: (tmp / "config.json").write_text("{}"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["backbone"]
    assert sorted(p.name for p in (tmp_path / "out" / "backbone").iterdir()) == ["config.json"]
