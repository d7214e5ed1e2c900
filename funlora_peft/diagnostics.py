"""What the trained adapters became: the rank of F_y per layer and the spread of alpha and omega over classes.

These are the paper's own diagnostics (its Figure 4: the rank each function family reaches; its Figure 5: the mean and
standard deviation over classes of alpha_i and omega_i per layer), computed from any model with FunLoRA layers, e.g.
a run folder loaded with `FunLoRAPipeline.from_pretrained`. `funlora inspect RUN --output_dir plots/` writes them.

The rank is numerical: F_y is rebuilt in float64 from the stored factors and its rank is the number of singular values
above `max(out, in) * eps(float64) * sigma_max` (`torch.linalg.matrix_rank`'s default), so that rounding does not
count as rank. An adapter at its identity initialisation (alpha = 0) has F_y = 0, rank 0.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .continual.importance import block_of, unet_order
from .tuner.layer import FunLoRALayer
from .tuner.model import base_model_name

RANK_PLOT, PARAMETERS_PLOT, DIAGNOSTICS_FILE = "rank.png", "alpha_omega.png", "diagnostics.json"


@dataclass
class LayerDiagnostics:
    """One adapted conv: the rank of F_y of each class and the per-function statistics over its classes."""

    name: str  # module name inside the UNet, as `target_modules` matches it
    function: str
    num_functions: int
    shape: tuple[int, int]  # (out_channels, in_channels): the largest rank F_y can have is their minimum
    class_ids: list[int]
    rank: list[int]  # per class, in `class_ids` order
    alpha_mean: list[float]  # per function i, over the classes
    alpha_std: list[float]
    omega_mean: list[float] | None  # `cos` only
    omega_std: list[float] | None

    @property
    def mean_rank(self) -> float:
        return sum(self.rank) / len(self.rank)


def _std(values: torch.Tensor) -> torch.Tensor:
    # The spread of a single class is 0, not NaN.
    return values.std(dim=0) if values.shape[0] > 1 else torch.zeros_like(values[0])


@torch.no_grad()
def adapter_diagnostics(
    model: nn.Module, adapter_names: Sequence[str] | None = None, unit_alpha: bool = False
) -> list[LayerDiagnostics]:
    """The diagnostics of every conv with FunLoRA tensors, in U-Net order.

    Args:
        model: a model with FunLoRA layers (a `PeftModel`, its base model, or a pipeline's `unet`).
        adapter_names: the adapters (tasks) whose classes count (default: all loaded). The adapters of one layer must
            share a function family and p, as the adapters of one run do.
        unit_alpha: the rank of F_y with every alpha_i = 1 instead of the stored alpha: the rank the terms f_i(a, b)
            span, which an untrained adapter (alpha = 0, F_y = 0) would start from.
    """
    layers = {base_model_name(n): m for n, m in model.named_modules() if isinstance(m, FunLoRALayer)}
    if not layers:
        raise ValueError("adapter_diagnostics: `model` has no FunLoRA layer; load a run or attach adapters first.")
    known = sorted({a for m in layers.values() for a in m.funlora_a})
    names = known if adapter_names is None else [adapter_names] if isinstance(adapter_names, str) else adapter_names
    unknown = [a for a in names if a not in known]
    if unknown:
        raise ValueError(f"adapter_names={list(names)}: {unknown} adapt no layer; loaded adapters: {known}.")
    result = []
    for name in unet_order(layers):
        module = layers[name]
        adapters = [a for a in names if a in module.funlora_a]
        if not adapters:
            continue
        families = {(module.funlora_function[a].name, module.funlora_alpha[a].shape[1]) for a in adapters}
        if len(families) > 1:
            raise ValueError(f"{name}: adapters {adapters} mix function families or p ({sorted(families)}).")
        (function, p), family = families.pop(), module.funlora_function[adapters[0]]
        ranks, alphas, omegas, class_ids = [], [], [], []
        for a in adapters:
            alpha = module.funlora_alpha[a]
            stored = [module.funlora_a[a], module.funlora_b[a], torch.ones_like(alpha) if unit_alpha else alpha]
            omega = module.funlora_omega[a].double() if a in module.funlora_omega else None
            matrices = family.compute(*(t.double() for t in stored), omega)
            ranks += torch.linalg.matrix_rank(matrices).tolist()
            alphas.append(module.funlora_alpha[a].double())
            if omega is not None:
                omegas.append(omega)
            class_ids += module.funlora_class_ids[a]
        alpha = torch.cat(alphas)
        omega = torch.cat(omegas) if omegas else None
        result.append(
            LayerDiagnostics(
                name=name,
                function=function,
                num_functions=p,
                shape=(module.out_channels, module.in_channels),
                class_ids=class_ids,
                rank=ranks,
                alpha_mean=alpha.mean(dim=0).tolist(),
                alpha_std=_std(alpha).tolist(),
                omega_mean=None if omega is None else omega.mean(dim=0).tolist(),
                omega_std=None if omega is None else _std(omega).tolist(),
            )
        )
    return result


def write_diagnostics(layers: list[LayerDiagnostics], output_dir: str | Path, title: str = "") -> list[Path]:
    """`diagnostics.json`, `rank.png` (Fig. 4) and `alpha_omega.png` (Fig. 5) in `output_dir`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .continual.importance import BLOCK_COLORS

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / DIAGNOSTICS_FILE, output_dir / RANK_PLOT, output_dir / PARAMETERS_PLOT]
    paths[0].write_text(json.dumps([asdict(layer) for layer in layers], indent=1) + "\n")
    x = list(range(len(layers)))
    colors = [BLOCK_COLORS.get(block_of(layer.name), "#2ca02c") for layer in layers]

    # Fig. 4: rank of F_y per layer, mean over classes with the min-max range; the number of functions p for scale.
    figure, axes = plt.subplots(figsize=(max(6.0, 0.22 * len(layers) + 2), 3.6))
    means = [layer.mean_rank for layer in layers]
    low = [m - min(layer.rank) for m, layer in zip(means, layers)]
    high = [max(layer.rank) - m for m, layer in zip(means, layers)]
    axes.bar(x, means, color=colors)
    axes.errorbar(x, means, yerr=[low, high], fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    for p in sorted({layer.num_functions for layer in layers}):
        axes.axhline(p, color="gray", linestyle="--", linewidth=0.8, label=f"p = {p}")
    axes.set_xticks(x)
    axes.set_xticklabels(x, fontsize=6)
    axes.set_xlabel("conv layer index (U-Net order)")
    axes.set_ylabel("rank of F_y (mean, min-max over classes)")
    functions = sorted({layer.function for layer in layers})
    axes.set_title(title or f"rank of F_y ({', '.join(functions)})")
    axes.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(paths[1], dpi=120)
    plt.close(figure)

    # Fig. 5: mean and std over classes of alpha_i (and omega_i for cos), layer by function index.
    panels = [("alpha", "mean"), ("alpha", "std")]
    if all(layer.omega_mean is not None for layer in layers):
        panels += [("omega", "mean"), ("omega", "std")]
    figure, grid = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), max(3.0, 0.12 * len(layers) + 1.5)))
    for axes, (parameter, statistic) in zip(grid, panels):
        rows = [getattr(layer, f"{parameter}_{statistic}") for layer in layers]
        width = max(len(row) for row in rows)
        values = torch.full((len(rows), width), float("nan"))
        for j, row in enumerate(rows):
            values[j, : len(row)] = torch.tensor(row)
        image = axes.imshow(values.numpy(), aspect="auto", cmap="coolwarm" if statistic == "mean" else "viridis")
        figure.colorbar(image, ax=axes, fraction=0.046)
        axes.set_title(f"{statistic} of {parameter}_i over classes", fontsize=9)
        axes.set_xlabel("function index i")
        axes.set_xticks(range(width))
        axes.set_xticklabels(range(1, width + 1), fontsize=6)
        axes.set_ylabel("conv layer index (U-Net order)")
    figure.tight_layout()
    figure.savefig(paths[2], dpi=120)
    plt.close(figure)
    return paths


def summary_table(layers: list[LayerDiagnostics]) -> str:
    """A markdown table, a row per layer: rank (mean, min-max), mean |alpha|, mean std of alpha (and omega)."""
    lines = [
        "| # | layer | out x in | rank of F_y (mean, min-max) | mean alpha_i | std of alpha_i | mean omega_i | "
        "std of omega_i |",
        "|---:|---|---|---|---:|---:|---:|---:|",
    ]

    def average(values):
        return "-" if values is None else f"{sum(values) / len(values):.3f}"

    for j, layer in enumerate(layers):
        lines.append(
            f"| {j} | {layer.name} | {layer.shape[0]} x {layer.shape[1]} | {layer.mean_rank:.1f} "
            f"({min(layer.rank)}-{max(layer.rank)}) | {average(layer.alpha_mean)} | {average(layer.alpha_std)} | "
            f"{average(layer.omega_mean)} | {average(layer.omega_std)} |"
        )
    return "\n".join(lines) + "\n"
