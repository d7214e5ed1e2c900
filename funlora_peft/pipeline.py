"""`FunLoRAPipeline`: class-conditional sampling from a FunLoRA run, in the shape of diffusers' DiTPipeline.

`sample_grid` is the one grid sampler every command uses (`funlora sample`, the training script's grids after each
task): one row per class, each class from its own seeded generator, so a class's row does not depend on the other
classes asked for.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    ImagePipelineOutput,
    UNet2DModel,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .continual.evaluation import generate_per_class
from .flow_matching import scheduler_timestep_to_model_timestep, velocity_to_scheduler
from .run_folder import (
    RunIndex,
    attach_tasks,
    check_scheduler,
    load_backbone,
    load_scheduler,
    read_index,
    save_run,
)
from .tuner.layer import as_class_id, as_class_labels
from .tuner.model import FunLoRAModel, _router_of

_HUB_KWARGS = ("token", "cache_dir", "local_files_only")


class FunLoRAPipeline(DiffusionPipeline):
    """Sample images of any loaded class from a UNet2DModel conditioned by FunLoRA adapters.

    The pipeline holds the BASE UNet (diffusers cannot save a PeftModel component); the adapters live in its convs and
    the FunLoRA tuner that routes them is found on the UNet itself, so `FunLoRAPipeline(**pipe.components)` and
    `FunLoRAPipeline.from_pipe(pipe)` sample the same classes. `peft_model` is the PeftModel wrapping the UNet when
    the pipeline was loaded with `from_pretrained`. The flow is integrated with diffusers'
    `FlowMatchEulerDiscreteScheduler` on a uniform sigma grid (the steps of `funlora_peft.flow_matching.sample_ode`)
    or its `FlowMatchHeunDiscreteScheduler` on its own grid (2 UNet evaluations per step but the last); the
    conversion between the schedulers' convention and the model's happens here only. `save_pretrained` writes the
    run-folder layout (`funlora_peft.run_folder`) that `from_pretrained` reads.

    Example:

        ```py
        >>> from funlora_peft import FunLoRAPipeline
        >>> pipe = FunLoRAPipeline.from_pretrained("runs/digits")                       # every task
        >>> pipe = FunLoRAPipeline.from_pretrained("runs/digits", tasks=["task_0", "task_2"])
        >>> images = pipe(class_labels=[3, 7, 7], num_inference_steps=20, generator=torch.manual_seed(0)).images
        >>> pipe.save_pretrained("runs/copy")                                           # a run folder again
        ```
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: FlowMatchEulerDiscreteScheduler, id2label: dict | None = None):
        super().__init__()
        check_scheduler(scheduler)
        self.register_modules(unet=unet, scheduler=scheduler)
        self.peft_model = None
        self.index: RunIndex | None = None
        self.id2label = {int(k): v for k, v in (id2label or {}).items()}
        self.register_to_config(id2label=self.id2label)  # so that from_pipe keeps the class names

    @property
    def tuner(self) -> FunLoRAModel | None:
        """The FunLoRA tuner routing the UNet's class labels, or None when no adapter is attached to it."""
        return _router_of(self.unet) if self.unet is not None else None

    # ----------------------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        tasks: list[str] | None = None,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        scheduler=None,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> FunLoRAPipeline:
        """Load a run folder, or a Hub repo with the same layout, with the adapters of `tasks` (all when None).

        For a Hub repo only the index, the backbone and the named tasks are downloaded (`token`, `cache_dir` and
        `local_files_only` go to the Hub). `dtype` (diffusers' spelling; `torch_dtype` is the older alias) loads the
        backbone in that dtype; the adapters stay fp32. The scheduler is the run's own when it saved one
        (`save_pretrained`), else a `FlowMatchEulerDiscreteScheduler`; `scheduler=` overrides both.
        """
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"`dtype`={dtype} and its older alias `torch_dtype`={torch_dtype} disagree; pass one.")
        dtype = dtype if dtype is not None else torch_dtype
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"`dtype` must be a torch.dtype such as torch.float16, got {dtype!r}.")
        if scheduler is not None:
            check_scheduler(scheduler)  # before anything is downloaded
        hub_kwargs = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
        if kwargs:
            warnings.warn(
                f"FunLoRAPipeline.from_pretrained does not use {sorted(kwargs)} and ignores them; it takes tasks, "
                f"revision, dtype, scheduler and the Hub's {list(_HUB_KWARGS)}.",
                stacklevel=2,
            )
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from .hub import download_run

            folder = download_run(str(pretrained_model_name_or_path), tasks=tasks, revision=revision, **hub_kwargs)
        index = read_index(folder)
        unet = load_backbone(folder, index, torch_dtype=dtype)
        if scheduler is None:
            scheduler = load_scheduler(folder, index) or FlowMatchEulerDiscreteScheduler()
        pipe = cls(unet=unet, scheduler=scheduler, id2label=index.class_names)
        pipe.index = index
        pipe.peft_model = attach_tasks(unet, folder, tasks, index=index)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write the pipeline as a run folder (backbone, one folder per adapter, the index, the scheduler's config):
        the layout `from_pretrained` reads, so that saving and loading again gives the same samples."""
        if self.tuner is None:
            raise ValueError("No adapters are attached to the UNet: there is no FunLoRA run to save.")
        unknown = sorted(set(kwargs) - {"safe_serialization", "push_to_hub"})
        if unknown or kwargs.get("push_to_hub") or kwargs.get("safe_serialization") is False:
            raise ValueError(
                f"FunLoRAPipeline.save_pretrained writes a run folder (safetensors only) and takes no "
                f"{unknown or kwargs}; push a run to the Hub with funlora_peft.push_to_hub(folder, repo_id)."
            )
        save_run(self.tuner, save_directory, class_names=self.id2label, scheduler=self.scheduler)

    @property
    def class_ids(self) -> list[int]:
        """The class ids the loaded adapters can sample."""
        return self.tuner.class_ids if self.tuner is not None else []

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> class id, for the loaded classes (as DiTPipeline's `labels`)."""
        return {name: class_id for class_id, name in self.id2label.items() if class_id in self.class_ids}

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map class names to class ids."""
        names = [label] if isinstance(label, str) else label
        if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
            raise TypeError(f"`label` must be a class name or a list of them, got {label!r}.")
        for name in names:
            if name not in self.labels:
                raise ValueError(f"Unknown label {name!r}; the loaded classes are {sorted(self.labels)}.")
        return [self.labels[name] for name in names]

    # ----------------------------------------------------------------------------------------------------------------
    # Sampling

    def _check_labels(self, class_labels) -> list[int]:
        if class_labels is None:
            raise ValueError("`class_labels` is required: pass the class id (or name) of every image to generate.")
        if isinstance(class_labels, str):
            class_labels = [class_labels]
        if isinstance(class_labels, (list, tuple)) and any(isinstance(c, str) for c in class_labels):
            labels = [
                self.get_label_ids(c)[0] if isinstance(c, str) else as_class_id(c, "class_labels")
                for c in class_labels
            ]
        else:
            one = isinstance(class_labels, (int, np.integer)) and not isinstance(class_labels, (bool, np.bool_))
            labels = as_class_labels(class_labels, 1 if one else None).tolist()
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

    def _can_merge(self) -> bool:
        """Whether writing W_y into the convs is exact: no conv stores its weight in fewer than 16 bits (float8)."""
        return all(
            torch.finfo(layer.get_base_layer().weight.dtype).bits >= 16 for layer in self.tuner._funlora_layers()
        )

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
            generator: torch generator(s) for the initial noise; a list needs one generator per image.
            output_type: "pil", "np" (`(batch, height, width, channels)` in [0, 1]) or "pt"
                (`(batch, channels, height, width)` in [0, 1]).
            return_dict: return an `ImagePipelineOutput` rather than a tuple.
            merge_single_class: when the batch holds a single class, write that class's weights into the convs for
                the whole loop (plain-UNet speed), and restore W0 afterwards. Skipped when a conv stores its weight
                in float8 (diffusers' layerwise casting), where the routed path is exact.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'pt', got {output_type!r}.")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise TypeError(
                f"`num_inference_steps` must be an integer number of steps, got {num_inference_steps!r} "
                f"({type(num_inference_steps).__name__})."
            )
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
        if self.tuner is None:
            raise ValueError(
                "No adapters are attached to the UNet: load a run with FunLoRAPipeline.from_pretrained(...), or build "
                "the pipeline from a UNet that carries FunLoRA adapters."
            )
        labels = self._check_labels(class_labels)
        one_per_sample = isinstance(generator, list) and all(isinstance(g, torch.Generator) for g in generator)
        if not (generator is None or isinstance(generator, torch.Generator) or one_per_sample):
            raise TypeError(
                f"`generator` must be None, a torch.Generator or a list of one per sample, got {generator!r}; e.g. "
                "generator=torch.manual_seed(0)."
            )
        if isinstance(generator, list) and len(generator) != len(labels):
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch "
                f"size of {len(labels)}. Make sure the batch size matches the length of the generators."
            )
        config = self.unet.config
        shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
        x = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        # On the CPU: the adapters plan their routing on the host, with no device synchronisation.
        label_tensor = torch.tensor(labels)

        if isinstance(self.scheduler, FlowMatchHeunDiscreteScheduler):
            self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        else:
            # A uniform grid from sigma = 1 (noise) to 0 (data): the steps of funlora_peft.flow_matching.sample_ode.
            sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
            self.scheduler.set_timesteps(sigmas=sigmas, device=self._execution_device)
        tuner = self.tuner
        # A class the caller merged stays merged: the call merges (and unmerges) only when no class is merged yet.
        merged_before = any(layer.merged for layer in tuner._funlora_layers())
        merged = merge_single_class and len(set(labels)) == 1 and not merged_before and self._can_merge()
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
            tuner.release_class_weights()  # built once for this call's steps; not kept beyond it

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
