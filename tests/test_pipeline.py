"""FunLoRAPipeline: loading some or all tasks of a run, sampling (routed, merged, every output type), grids, and what
a diffusers user expects (components, save and load, dtype, schedulers, layerwise casting)."""

import numpy as np
import pytest
import torch
from conftest import load_pipeline, sample_images
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, UNet2DModel

from funlora_peft import FunLoRAPipeline
from funlora_peft.flow_matching import sample_ode, shifted_time_grid, sigma_to_t, t_to_model_timestep
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
    layers = pipe.tuner._funlora_layers()
    assert any(layer._weight_cache is not None for layer in layers)  # kept by the model between the steps
    generator = torch.Generator().manual_seed(5)
    got = pipe(class_labels=labels, num_inference_steps=4, generator=generator, output_type="pt")
    torch.testing.assert_close(got.images, (expected / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)
    # the pipeline builds the class weights for its call's steps and does not keep them beyond it
    assert all(layer._weight_cache is None for layer in layers)


def test_a_shifted_scheduler_integrates_the_shifted_grid(run_folder):
    """A scheduler with a timestep shift samples the ODE on `shifted_time_grid`, the grid benchmark.py and the
    evaluation of train.py use for the same shift; the shift changes the samples."""
    pipe = load_pipeline(run_folder)
    labels = torch.tensor([2, 0, 4])
    x_0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = sample_ode(
            lambda x, t: pipe.unet(x, t_to_model_timestep(t), class_labels=labels).sample,
            x_0,
            4,
            time_grid=shifted_time_grid(4, 3.0),
        )
    unshifted = pipe(class_labels=labels, num_inference_steps=4, generator=torch.manual_seed(5), output_type="pt")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    got = pipe(class_labels=labels, num_inference_steps=4, generator=torch.manual_seed(5), output_type="pt")
    torch.testing.assert_close(got.images, (expected / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)
    assert (got.images - unshifted.images).abs().max() > 1e-2


def test_single_class_batch_is_merged_and_equals_routed(run_folder):
    pipe = load_pipeline(run_folder)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "funlora_" not in k}
    kwargs = dict(class_labels=[3, 3], num_inference_steps=3, output_type="pt")
    merged = pipe(**kwargs, generator=torch.manual_seed(1)).images
    routed = pipe(**kwargs, generator=torch.manual_seed(1), merge_single_class=False).images
    torch.testing.assert_close(merged, routed, rtol=1e-5, atol=1e-5)
    # W0 restored bit-exactly afterwards
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in weights.items())


def test_a_class_merged_by_the_caller_stays_merged(run_folder):
    pipe = load_pipeline(run_folder)
    kwargs = dict(class_labels=[3, 3], num_inference_steps=3, output_type="pt")
    expected = pipe(**kwargs, generator=torch.manual_seed(1)).images
    pipe.tuner.merge_adapter(class_label=3)
    merged = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "funlora_" not in k}
    torch.testing.assert_close(pipe(**kwargs, generator=torch.manual_seed(1)).images, expected, rtol=0, atol=0)
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in merged.items())  # still class 3's weights
    assert {layer._merged_class for layer in pipe.tuner._funlora_layers()} == {3}


def test_one_numpy_class_id_is_one_image(run_folder):
    pipe = load_pipeline(run_folder)
    kwargs = dict(num_inference_steps=2, output_type="pt")
    expected = pipe(class_labels=3, generator=torch.manual_seed(1), **kwargs).images
    got = pipe(class_labels=np.int64(3), generator=torch.manual_seed(1), **kwargs).images
    assert got.shape[0] == 1 and torch.equal(got, expected)


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


# ---------------------------------------------------------------------------------------------------------------------
# What a diffusers user expects of a pipeline


def test_pipeline_from_components_or_from_pipe_samples_the_same_classes(run_folder):
    pipe = load_pipeline(run_folder)
    expected = sample_images(pipe, [4, 0, 2])
    for other in (FunLoRAPipeline(**pipe.components, id2label=pipe.id2label), FunLoRAPipeline.from_pipe(pipe)):
        other.set_progress_bar_config(disable=True)
        assert other.class_ids == [0, 1, 2, 3, 4] and other.labels == pipe.labels
        assert torch.equal(sample_images(other, [4, 0, 2]), expected)


def test_save_pretrained_writes_a_run_that_loads_to_the_same_samples(run_folder, tmp_path):
    pipe = load_pipeline(run_folder)
    pipe.scheduler = FlowMatchHeunDiscreteScheduler()
    pipe.save_pretrained(tmp_path / "copy")
    again = load_pipeline(tmp_path / "copy")
    assert isinstance(again.scheduler, FlowMatchHeunDiscreteScheduler)  # the scheduler travels with the run
    assert again.labels == pipe.labels and again.class_ids == pipe.class_ids
    assert torch.equal(sample_images(again, [3, 0, 4, 4]), sample_images(pipe, [3, 0, 4, 4]))
    # The backbone folder is a plain diffusers UNet: every weight real, none on the meta device, no adapter key.
    unet = UNet2DModel.from_pretrained(tmp_path / "copy" / "backbone")
    assert all(not p.is_meta for p in unet.parameters())
    assert not any("funlora" in key for key in unet.state_dict())


def test_from_pretrained_takes_dtype_or_its_older_alias(run_folder):
    assert load_pipeline(run_folder, dtype=torch.bfloat16).unet.dtype == torch.bfloat16
    assert load_pipeline(run_folder, torch_dtype=torch.bfloat16).unet.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="disagree; pass one"):
        load_pipeline(run_folder, dtype=torch.bfloat16, torch_dtype=torch.float16)


def test_from_pretrained_warns_about_keywords_it_does_not_use(run_folder):
    with pytest.warns(UserWarning, match=r"does not use \['device_map', 'varaint'\]"):
        load_pipeline(run_folder, varaint="fp16", device_map="cpu")


def test_heun_scheduler_integrates_the_same_ode_with_two_evaluations_per_step(run_folder):
    pipe = load_pipeline(run_folder)
    pipe.scheduler = FlowMatchHeunDiscreteScheduler()
    labels = torch.tensor([2, 0, 4])
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    got = pipe(class_labels=labels, num_inference_steps=4, generator=torch.manual_seed(5), output_type="pt").images
    hook.remove()
    assert len(calls) == 2 * 4 - 1  # the last step (to sigma = 0) is a plain Euler step

    # Heun's method written out in the model's convention (t = 1 - sigma, velocity dx/dt), on the scheduler's grid.
    times = sigma_to_t(pipe.scheduler.sigmas.unique_consecutive().double())
    x = torch.randn(3, 1, 8, 8, generator=torch.manual_seed(5))

    def velocity(x, t):
        timestep = t_to_model_timestep(t).float().expand(3)
        return pipe.unet(x, timestep, class_labels=labels).sample

    with torch.no_grad():
        for t, t_next in zip(times[:-1], times[1:]):
            dt = float(t_next - t)
            slope = velocity(x, t)
            guess = x + dt * slope
            x = guess if t_next == 1 else x + dt * (slope + velocity(guess, t_next)) / 2
    # The scheduler recovers the slope as (x - (x - sigma v)) / sigma in float32: at sigma = 1e-3 that cancellation
    # costs eps * |x| / sigma ~ 1.2e-7 * 5 / 1e-3 = 6e-4 in the slope, times dt / 2 <= 1/6 for the step that uses it:
    # 1e-4 in x, half that in the image. A wrong sign or grid would change the images by order 0.1.
    torch.testing.assert_close(got, (x / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-3)


def test_layerwise_casting_samples_without_merging_into_float8_weights(run_folder):
    pipe = load_pipeline(run_folder)
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    stored = {name: p.clone() for name, p in pipe.unet.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert stored  # the convs store their weights in float8
    kwargs = dict(class_labels=[1, 1], num_inference_steps=3, output_type="pt")
    single = pipe(**kwargs, generator=torch.manual_seed(0)).images
    routed = pipe(**kwargs, generator=torch.manual_seed(0), merge_single_class=False).images
    assert torch.isfinite(single).all() and torch.equal(single, routed)  # no merge: the routed path, exactly
    mixed = sample_images(pipe, [0, 3])
    assert torch.isfinite(mixed).all()
    current = dict(pipe.unet.named_parameters())
    assert all(torch.equal(current[name].view(torch.uint8), p.view(torch.uint8)) for name, p in stored.items())
