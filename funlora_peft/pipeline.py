"""`FunLoRAPipeline`: class-conditional sampling from a FunLoRA run, in the shape of diffusers' DiTPipeline.

`sample_grid` is the one grid sampler every command uses (`funlora sample`, the training script's grids after each
task): one row per class, each class from its own seeded generator, so a class's row does not depend on the other
classes asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .continual.evaluation import generate_per_class
from .flow_matching import scheduler_timestep_to_model_timestep, velocity_to_scheduler
from .run_folder import RunIndex, attach_tasks, load_backbone, read_index


class FunLoRAPipeline(DiffusionPipeline):
    """Sample images of any loaded class from a UNet2DModel conditioned by FunLoRA adapters.

    The pipeline holds the BASE UNet (diffusers cannot save a PeftModel component) and attaches the adapters itself;
    `peft_model` is the PeftModel wrapping it. The flow is integrated with a `FlowMatchEulerDiscreteScheduler` (or its
    Heun variant) on a uniform sigma grid; the conversion between the scheduler's convention and the model's
    (`funlora_peft.flow_matching`) happens here only.

    Example:

        ```py
        >>> from funlora_peft import FunLoRAPipeline
        >>> pipe = FunLoRAPipeline.from_pretrained("runs/digits")                       # every task
        >>> pipe = FunLoRAPipeline.from_pretrained("runs/digits", tasks=["task_0", "task_2"])
        >>> images = pipe(class_labels=[3, 7, 7], num_inference_steps=20, generator=torch.manual_seed(0)).images
        ```
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: FlowMatchEulerDiscreteScheduler, id2label: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.peft_model = None
        self.index: RunIndex | None = None
        self.id2label = {int(k): v for k, v in (id2label or {}).items()}

    # ----------------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        tasks: list[str] | None = None,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        scheduler=None,
        **hub_kwargs,
    ) -> FunLoRAPipeline:
        """Load a run folder, or a Hub repo with the same layout, with the adapters of `tasks` (all when None).

        For a Hub repo only the index, the backbone and the named tasks are downloaded.
        """
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from .hub import download_run

            folder = download_run(str(pretrained_model_name_or_path), tasks=tasks, revision=revision, **hub_kwargs)
        index = read_index(folder)
        unet = load_backbone(folder, index, torch_dtype=torch_dtype)
        pipe = cls(unet=unet, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), id2label=index.class_names)
        pipe.index = index
        pipe.peft_model = attach_tasks(unet, folder, tasks, index=index)
        return pipe

    @property
    def class_ids(self) -> list[int]:
        """The class ids the loaded adapters can sample."""
        return self.peft_model.base_model.class_ids if self.peft_model is not None else []

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> class id, for the loaded classes (as DiTPipeline's `labels`)."""
        return {name: class_id for class_id, name in self.id2label.items() if class_id in self.class_ids}

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map class names to class ids."""
        names = [label] if isinstance(label, str) else list(label)
        for name in names:
            if name not in self.labels:
                raise ValueError(f"Unknown label {name!r}; the loaded classes are {sorted(self.labels)}.")
        return [self.labels[name] for name in names]

    # ----------------------------------------------------------------------------------------------------------------
    # Sampling

    def _check_labels(self, class_labels) -> list[int]:
        if isinstance(class_labels, int) or isinstance(class_labels, str):
            class_labels = [class_labels]
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.tolist()
        labels = [self.get_label_ids(c)[0] if isinstance(c, str) else int(c) for c in class_labels]
        if not labels:
            raise ValueError("`class_labels` is empty: pass at least one class id.")
        unknown = sorted({c for c in labels if c not in self.class_ids})
        if unknown:
            hint = ""
            if self.index is not None:
                owners = {c: self.index.owner_of(c) for c in unknown}
                owned = {c: o for c, o in owners.items() if o is not None}
                if owned:
                    hint = (
                        " "
                        + ", ".join(f"class {c} belongs to {o!r}, which was not loaded" for c, o in owned.items())
                        + "; pass it in `tasks=`."
                    )
            raise ValueError(f"class_labels {unknown} are not loaded (loaded: {self.class_ids}).{hint}")
        return labels

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | int | torch.Tensor,
        num_inference_steps: int = 20,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        merge_single_class: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per entry of `class_labels`.

        Args:
            class_labels: global class ids (or names), may mix classes of several tasks.
            num_inference_steps: ODE steps; the number of UNet evaluations (NFE) for the Euler scheduler.
            generator: torch generator(s) for the initial noise.
            output_type: "pil", "np" (`(batch, height, width, channels)` in [0, 1]) or "pt"
                (`(batch, channels, height, width)` in [0, 1]).
            return_dict: return an `ImagePipelineOutput` rather than a tuple.
            merge_single_class: when the batch holds a single class, write that class's weights into the convs for
                the whole loop (plain-UNet speed), and restore W0 afterwards.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'pt', got {output_type!r}.")
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
        if self.peft_model is None:
            raise ValueError("No adapters are attached: load the pipeline with FunLoRAPipeline.from_pretrained(...).")
        labels = self._check_labels(class_labels)
        config = self.unet.config
        shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
        x = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        # On the CPU: the adapters plan their routing on the host, with no device synchronisation.
        label_tensor = torch.tensor(labels)

        # A uniform grid from sigma = 1 (noise) to 0 (data): the same steps as funlora_peft.flow_matching.sample_ode.
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=self._execution_device)
        tuner = self.peft_model.base_model
        merged = merge_single_class and len(set(labels)) == 1
        if merged:
            tuner.merge_adapter(class_label=labels[0])
        try:
            for timestep in self.progress_bar(self.scheduler.timesteps):
                model_timestep = scheduler_timestep_to_model_timestep(timestep).expand(len(labels)).to(x.dtype)
                velocity = self.unet(x, model_timestep, class_labels=label_tensor).sample
                x = self.scheduler.step(velocity_to_scheduler(velocity), timestep, x).prev_sample
        finally:
            if merged:
                tuner.unmerge_adapter()

        images = (x.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            output = images.cpu()
        else:
            output = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                output = self.numpy_to_pil(output)
        if not return_dict:
            return (output,)
        return ImagePipelineOutput(images=output)


# --------------------------------------------------------------------------------------------------------------------
# Grids of samples
# --------------------------------------------------------------------------------------------------------------------


def pipeline_sample_fn(
    pipe: FunLoRAPipeline, num_inference_steps: int
) -> Callable[[int, int, torch.Generator], torch.Tensor]:
    """A `funlora_peft.continual.evaluation.SampleFn` over `pipe`: single-class batches, images in [-1, 1]."""

    def sample_fn(class_label: int, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        images = pipe(
            class_labels=[int(class_label)] * num_samples,
            num_inference_steps=num_inference_steps,
            generator=generator,
            output_type="pt",
        ).images
        return images * 2 - 1

    return sample_fn


def default_grid_scale(resolution: int) -> int:
    """How many times a grid of `resolution`-pixel samples is enlarged: to about 64 pixels per sample, at least 1."""
    return max(1, round(64 / resolution))


def make_image_grid(images: torch.Tensor, rows: int, *, padding: int = 1, scale: int = 1) -> Image.Image:
    """Tile `(rows * cols, channels, height, width)` images in [0, 1] row by row into one PIL image.

    Images are separated by `padding` white pixels and the grid is enlarged `scale` times (nearest neighbour), so
    that small samples stay legible.
    """
    if images.dim() != 4 or rows < 1 or images.shape[0] % rows:
        raise ValueError(f"images must be (rows * cols, C, H, W) with rows={rows}, got {tuple(images.shape)}.")
    count, channels, height, width = images.shape
    cols = count // rows
    grid = torch.ones(channels, rows * (height + padding) + padding, cols * (width + padding) + padding)
    for i, image in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, c = divmod(i, cols)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        grid[:, top : top + height, left : left + width] = image
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array[:, :, 0] if channels == 1 else array, mode="L" if channels == 1 else "RGB")
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    return picture


def sample_grid(
    pipe: FunLoRAPipeline,
    class_ids: Sequence[int],
    num_samples: int = 8,
    *,
    seed: int = 0,
    num_inference_steps: int = 20,
    scale: int | None = None,
) -> Image.Image:
    """A PNG-ready grid of samples: one row per class of `class_ids`, `num_samples` per row.

    Class `c` is sampled in one single-class batch with the generator of `generate_per_class` (seeded by `seed` and
    `c` only), so its row is the same whatever other classes are asked for. `scale` enlarges the grid (default:
    `default_grid_scale` of the resolution).
    """
    class_ids = [int(c) for c in class_ids]
    if not class_ids:
        raise ValueError("class_ids is empty: pass at least one class to sample.")
    images, _ = generate_per_class(pipeline_sample_fn(pipe, num_inference_steps), class_ids, num_samples, seed=seed)
    scale = default_grid_scale(pipe.unet.config.sample_size) if scale is None else scale
    return make_image_grid((images.cpu() + 1) / 2, rows=len(class_ids), scale=scale)
