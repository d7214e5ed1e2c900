"""FunLoRAPipeline: loading some or all tasks of a run, sampling (routed, merged, every output type), grids."""

import numpy as np
import pytest
import torch
from conftest import load_pipeline

from funlora_peft.flow_matching import sample_ode, t_to_model_timestep
from funlora_peft.pipeline import make_image_grid


def test_pipeline_samples_mixed_classes_in_every_output_type(run_folder):
    pipe = load_pipeline(run_folder)
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
    pipe = load_pipeline(run_folder)
    labels = torch.tensor([2, 0, 4])
    generator = torch.Generator().manual_seed(5)
    x_0 = torch.randn(3, 1, 8, 8, generator=generator)
    with torch.no_grad():
        expected = sample_ode(lambda x, t: pipe.unet(x, t_to_model_timestep(t), class_labels=labels).sample, x_0, 4)
    generator = torch.Generator().manual_seed(5)
    got = pipe(class_labels=labels, num_inference_steps=4, generator=generator, output_type="pt")
    torch.testing.assert_close(got.images, (expected / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_single_class_batch_is_merged_and_equals_routed(run_folder):
    pipe = load_pipeline(run_folder)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "funlora_" not in k}
    kwargs = dict(class_labels=[3, 3], num_inference_steps=3, output_type="pt")
    merged = pipe(**kwargs, generator=torch.manual_seed(1)).images
    routed = pipe(**kwargs, generator=torch.manual_seed(1), merge_single_class=False).images
    torch.testing.assert_close(merged, routed, rtol=1e-5, atol=1e-5)
    # W0 restored bit-exactly afterwards
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in weights.items())


def test_loading_some_tasks_only(run_folder):
    full = load_pipeline(run_folder)
    part = load_pipeline(run_folder, tasks=["task_0", "task_2"])
    assert part.class_ids == [0, 1, 4]
    kwargs = dict(class_labels=[4, 0], num_inference_steps=3, output_type="pt")
    torch.testing.assert_close(
        part(**kwargs, generator=torch.manual_seed(2)).images, full(**kwargs, generator=torch.manual_seed(2)).images
    )
    with pytest.raises(ValueError, match="class 2 belongs to 'task_1', which was not loaded"):
        part(class_labels=[0, 2])
    with pytest.raises(ValueError, match=r"`tasks` names \['task_9'\].*\['task_0', 'task_1', 'task_2'\]"):
        load_pipeline(run_folder, tasks=["task_9"])


def test_image_grid_has_one_row_per_class():
    images = torch.rand(3 * 4, 1, 8, 8)
    grid = make_image_grid(images, rows=3, padding=1, scale=2)
    assert grid.size == ((4 * 9 + 1) * 2, (3 * 9 + 1) * 2) and grid.mode == "L"
    assert make_image_grid(torch.rand(2, 3, 8, 8), rows=2).mode == "RGB"
