"""FunLoRAPipeline and the run folder layout: loading, sampling, and refusing what does not check out."""

import json

import numpy as np
import pytest
import torch
from conftest import make_unet
from peft import get_peft_model
from safetensors.torch import load_file, save_file

from funlora_peft import FunLoRAConfig, FunLoRALayer
from funlora_peft.flow_matching import sample_ode, t_to_model_timestep
from funlora_peft.pipeline import FunLoRAPipeline
from funlora_peft.run_folder import TaskEntry, attach_tasks, read_index, write_index

CLASS_NAMES = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four"}
TASKS = {"task_0": [0, 1], "task_1": [2, 3], "task_2": [4]}


def make_run(folder, function="cos"):
    """A run folder: a tiny backbone and three tasks with random (non-identity) adapters."""
    unet = make_unet("attn")
    unet.save_pretrained(folder / "backbone")
    model = None
    for name, class_ids in TASKS.items():
        config = FunLoRAConfig(class_ids=class_ids, function=function, init_seed=1)
        if model is None:
            model = get_peft_model(unet, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".funlora_alpha." in n:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    model.save_pretrained(folder, save_embedding_layers=False)
    entries = [TaskEntry(name, ids, function, 10, None) for name, ids in TASKS.items()]
    write_index(folder, entries, CLASS_NAMES)
    return model


@pytest.fixture
def run_folder(tmp_path):
    make_run(tmp_path)
    return tmp_path


def load(folder, **kwargs):
    pipe = FunLoRAPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_samples_mixed_classes_in_every_output_type(run_folder):
    pipe = load(run_folder)
    assert pipe.class_ids == [0, 1, 2, 3, 4]
    out = pipe(class_labels=[3, 0, 4], num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt")
    assert out.images.shape == (3, 1, 8, 8) and out.images.min() >= 0 and out.images.max() <= 1
    as_np = pipe(class_labels=[3, 0, 4], num_inference_steps=3, generator=torch.manual_seed(0), output_type="np")
    assert as_np.images.shape == (3, 8, 8, 1)
    np.testing.assert_allclose(as_np.images, out.images.permute(0, 2, 3, 1).numpy())
    pil = pipe(class_labels=["three", "zero"], num_inference_steps=2, output_type="pil").images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    assert pipe.get_label_ids(["four", "one"]) == [4, 1]
    # the pipeline keeps the base UNet class as its component
    assert type(pipe.unet).__name__ == "UNet2DModel"


def test_sampling_is_the_euler_ode_of_the_routed_model(run_folder):
    pipe = load(run_folder)
    labels = torch.tensor([2, 0, 4])
    generator = torch.Generator().manual_seed(5)
    x_0 = torch.randn(3, 1, 8, 8, generator=generator)
    with torch.no_grad():
        expected = sample_ode(lambda x, t: pipe.unet(x, t_to_model_timestep(t), class_labels=labels).sample, x_0, 4)
    generator = torch.Generator().manual_seed(5)
    got = pipe(class_labels=labels, num_inference_steps=4, generator=generator, output_type="pt")
    torch.testing.assert_close(got.images, (expected / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_single_class_batch_is_merged_and_equals_routed(run_folder):
    pipe = load(run_folder)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "funlora_" not in k}
    kwargs = dict(class_labels=[3, 3], num_inference_steps=3, output_type="pt")
    merged = pipe(**kwargs, generator=torch.manual_seed(1)).images
    routed = pipe(**kwargs, generator=torch.manual_seed(1), merge_single_class=False).images
    torch.testing.assert_close(merged, routed, rtol=1e-5, atol=1e-5)
    # W0 restored bit-exactly afterwards
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in weights.items())


def test_loading_some_tasks_only(run_folder):
    full = load(run_folder)
    part = load(run_folder, tasks=["task_0", "task_2"])
    assert part.class_ids == [0, 1, 4]
    kwargs = dict(class_labels=[4, 0], num_inference_steps=3, output_type="pt")
    torch.testing.assert_close(
        part(**kwargs, generator=torch.manual_seed(2)).images, full(**kwargs, generator=torch.manual_seed(2)).images
    )
    with pytest.raises(ValueError, match="class 2 belongs to 'task_1', which was not loaded"):
        part(class_labels=[0, 2])
    with pytest.raises(ValueError, match=r"`tasks` names \['task_9'\].*\['task_0', 'task_1', 'task_2'\]"):
        load(run_folder, tasks=["task_9"])


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
