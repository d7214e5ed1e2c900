"""Layer importance: which convs of the U-Net are worth adapting.

The importance of an adapted conv `l` is the average signed rescaling its adapters apply to its filters:

    I_l = mean over the classes y of the loaded adapters of ( mean over (o, i) of F^l_y[o, i] )

where W^l_y = W^l_0 * (1 + F^l_y). A layer whose |I_l| stays near 0 leaves its filters as the backbone has them for
every class; the layers with the largest |I_l| carry the class conditioning and are the ones to adapt.

```python
from funlora_peft.continual.importance import compute_layer_importance, select_target_modules

scores = compute_layer_importance(peft_model)  # {conv module name: I_l}, signed, in U-Net order
targets = select_target_modules(scores, top_k=15)  # the 15 names with the largest |I_l|, in U-Net order
FunLoRAConfig(class_ids=[4, 5], target_modules=targets)
```

`probe_layer_importance` gets the scores from data instead: it trains a throwaway adapter on every conv of a COPY
of the backbone (frozen) for a few steps and scores it, leaving the backbone untouched.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..flow_matching import flow_matching_loss, make_flow_matching_batch, t_to_model_timestep
from ..tuner.config import FunLoRAConfig
from ..tuner.layer import FunLoRALayer
from ..tuner.model import base_model_name
from .data import to_model_range

PROBE_ADAPTER = "importance_probe"
SELECTIONS = ("top_k", "fraction", "bottom_k", "random_k")


def compute_layer_importance(model: nn.Module, adapter_names: Sequence[str] | None = None) -> dict[str, float]:
    """I_l of every conv that has FunLoRA tensors, in U-Net order.

    Args:
        model: a model with FunLoRA layers (the `PeftModel` from `get_peft_model`, or its base model).
        adapter_names: the adapters whose classes are averaged (default: every adapter loaded in the model). A layer
            none of them adapts is absent from the result.

    Returns:
        `{module name inside the base model: I_l}` in U-Net order (`unet_order`), e.g.
        `{"down_blocks.0.resnets.0.conv1": 0.031, ...}`; the names can be passed as `FunLoRAConfig.target_modules`.
        Each class counts once, whatever its adapter.
    """
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, FunLoRALayer)]
    if not layers:
        raise ValueError(
            "compute_layer_importance: `model` has no FunLoRA layer; attach adapters with get_peft_model."
        )
    if adapter_names is not None:
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        known = {a for _, module in layers for a in module.funlora_a}
        unknown = [a for a in adapter_names if a not in known]
        if unknown:
            raise ValueError(
                f"adapter_names={list(adapter_names)}: {unknown} adapt no layer of this model; loaded adapters: "
                f"{sorted(known)}."
            )
    scores: dict[str, float] = {}
    with torch.no_grad():
        for name, module in layers:
            names = [a for a in module.funlora_a if adapter_names is None or a in adapter_names]
            if not names:
                continue
            # Mean over (o, i) per class, then mean over all classes of those adapters.
            per_class = torch.cat([module.functional_matrix(a).double().mean(dim=(1, 2)) for a in names])
            scores[base_model_name(name)] = per_class.mean().item()
    return {name: scores[name] for name in unet_order(scores)}


_PART_RANK = {"in": 0, "down": 1, "mid": 2, "up": 3, "out": 4}


def unet_order(names: Iterable[str]) -> list[str]:
    """Module names in the U-Net's data-flow order: conv_in, down blocks, mid block, up blocks, conv_out.

    `UNet2DModel` registers `mid_block` after `up_blocks`, so its module order is not the data-flow order; within a
    part the module order is kept.
    """
    names = list(names)
    return sorted(names, key=lambda name: _PART_RANK.get(block_of(name), len(_PART_RANK)))


def select_target_modules(
    scores: dict[str, float],
    top_k: int | None = None,
    *,
    fraction: float | None = None,
    largest: bool = True,
) -> list[str]:
    """The `top_k` (or `fraction` of the) layers with the largest |I_l|, returned in U-Net order.

    Args:
        scores: `compute_layer_importance`'s result (its order is kept).
        top_k: how many layers to keep, 1 <= top_k <= len(scores).
        fraction: instead of `top_k`: keep ceil(fraction * len(scores)) layers, 0 < fraction <= 1.
        largest: False keeps the layers with the SMALLEST |I_l| (the least important ones; for ablations).

    Ties in |I_l| keep the earlier layer.
    """
    if not scores:
        raise ValueError("select_target_modules: `scores` is empty; compute them with compute_layer_importance.")
    if (top_k is None) == (fraction is None):
        raise ValueError(f"select_target_modules: pass exactly one of top_k and fraction (got {top_k=}, {fraction=}).")
    if fraction is not None:
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ValueError(f"fraction={fraction!r} must be in (0, 1]; e.g. fraction=0.25 keeps a quarter.")
        top_k = max(1, math.ceil(fraction * len(scores)))
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(scores):
        raise ValueError(
            f"top_k={top_k!r} must be an integer between 1 and the number of scored layers, {len(scores)}."
        )
    names = list(scores)
    order = sorted(range(len(names)), key=lambda j: (-abs(scores[names[j]]) if largest else abs(scores[names[j]]), j))
    keep = set(order[:top_k])
    return [name for j, name in enumerate(names) if j in keep]


def parse_selection(value: str) -> dict:
    """A layer selection as text -> `{kind: number}`: `"top_k=15"` -> `{"top_k": 15}`, `"fraction=0.25"` ->
    `{"fraction": 0.25}`, and for ablations `"bottom_k=5"` (the least important) and `"random_k=5"` (drawn at random).
    """
    kind, sep, number = str(value).partition("=")
    kind = kind.strip()
    try:
        if sep and kind in ("top_k", "bottom_k", "random_k"):
            parsed = int(number)
            if parsed >= 1:
                return {kind: parsed}
        elif sep and kind == "fraction":
            parsed = float(number)
            if 0 < parsed <= 1:
                return {"fraction": parsed}
    except ValueError:
        pass
    raise ValueError(
        f"layer selection {value!r} must be top_k=K with an integer K >= 1 (e.g. top_k=15), fraction=F with "
        "0 < F <= 1 (e.g. fraction=0.25), or for ablations bottom_k=K or random_k=K."
    )


def apply_selection(scores: dict[str, float], selection: str, seed: int = 0) -> list[str]:
    """The convs a selection (`parse_selection`'s text) keeps from `scores`, in U-Net order.

    `top_k` and `fraction` keep the largest |I_l| (`select_target_modules`), `bottom_k` the smallest, `random_k` draws
    K at random with `seed` (`random_target_modules`). K larger than the number of scored convs keeps them all.
    """
    ((kind, number),) = parse_selection(selection).items()
    if kind == "fraction":
        return select_target_modules(scores, fraction=number)
    number = min(number, len(scores))
    if kind == "random_k":
        return random_target_modules(scores, number, seed=seed)
    return select_target_modules(scores, top_k=number, largest=kind == "top_k")


@dataclass
class ImportanceRecord:
    """A run's layer selection, stored as `importance.json`: the scores, how they were obtained, the convs kept."""

    select_layers: str = field(metadata={"help": "The selection, e.g. 'top_k=15' (`parse_selection`)."})
    source: str = field(metadata={"help": "Where the scores come from: 'probe' or 'task0'."})
    detail: str = field(metadata={"help": "A sentence on how the scores were obtained."})
    scores: dict[str, float] = field(metadata={"help": "{conv module name: I_l}, in U-Net order."})
    selected: list[str] = field(metadata={"help": "The convs tasks 1, 2, ... adapt, in U-Net order."})
    seconds: float | None = field(default=None, metadata={"help": "Time spent scoring."})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> ImportanceRecord:
        if not isinstance(data, Mapping):
            raise TypeError(f"an importance record must be a JSON object, got {type(data).__name__}.")
        if not isinstance(data.get("scores"), Mapping) or not isinstance(data.get("selected"), list):
            raise ValueError("it lacks its 'scores' or 'selected' entry")
        return cls(
            select_layers=str(data.get("select_layers")),
            source=str(data.get("source")),
            detail=str(data.get("detail", data.get("source"))),
            scores={str(k): float(v) for k, v in data["scores"].items()},
            selected=[str(name) for name in data["selected"]],
            seconds=data.get("seconds"),
        )


def random_target_modules(scores: dict[str, float] | Sequence[str], k: int, seed: int) -> list[str]:
    """`k` layers drawn uniformly at random (seeded), in U-Net order: the control of an importance ablation."""
    names = list(scores)
    if not 1 <= k <= len(names):
        raise ValueError(f"k={k!r} must be between 1 and the number of layers, {len(names)}.")
    keep = set(random.Random(seed).sample(range(len(names)), k))
    return [name for j, name in enumerate(names) if j in keep]


def _class_ids_of(dataloader: Iterable) -> list[int]:
    dataset = getattr(dataloader, "dataset", None)
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        labels = tensors[1]
    else:
        labels = torch.cat([torch.as_tensor(batch[1]).reshape(-1) for batch in dataloader])
    return sorted(int(c) for c in torch.unique(labels))


def probe_layer_importance(
    backbone: nn.Module,
    dataloader: Iterable,
    *,
    steps: int = 50,
    function: str = "cos",
    num_functions: int = 10,
    class_ids: Sequence[int] | None = None,
    learning_rate: float = 1e-1,
    seed: int = 0,
    target_modules: list[str] | str | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Scores from data: train a throwaway adapter on every conv of a copy of the frozen backbone, then score it.

    Args:
        backbone: a `UNet2DModel` (or a FunLoRA `PeftModel`, whose adapters are kept frozen and play no part in the
            scores). It is deep-copied; the backbone itself is never modified.
        dataloader: yields `(images, class_labels)` batches, images in [-1, 1]; cycled for `steps` steps.
        steps: optimisation steps (AdamW, lr `learning_rate`) of the throwaway adapter.
        function, num_functions: the adapter's function family and p, as in `FunLoRAConfig`.
        class_ids: the classes of the adapter (default: the labels of the dataloader's dataset). They must not
            clash with the class ids of the backbone's own adapters.
        seed: seeds the adapter's init, the noise and the times.
        target_modules: the convs to probe (default: every conv).
        device: where to train (default: the backbone's device).

    Returns:
        `{conv module name: I_l}` of the throwaway adapter, as `compute_layer_importance`.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer (optimisation steps of the probe).")
    if class_ids is None:
        class_ids = _class_ids_of(dataloader)
    if not class_ids:
        raise ValueError("probe_layer_importance: `dataloader` yields no labelled images.")
    from peft import PeftModel, get_peft_model

    if device is None:
        device = next(backbone.parameters()).device
    model = copy.deepcopy(backbone)
    config = FunLoRAConfig(
        class_ids=list(class_ids),
        function=function,
        num_functions=num_functions,
        target_modules=target_modules,
        init_seed=seed,
    )
    if isinstance(model, PeftModel):
        model.add_adapter(PROBE_ADAPTER, config)
        model.set_adapter(PROBE_ADAPTER)
    else:
        model = get_peft_model(model, config, adapter_name=PROBE_ADAPTER)
    model.to(device)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(f".{PROBE_ADAPTER}"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    model.train()
    batches = itertools.cycle(dataloader)
    for _ in range(steps):
        images, labels = next(batches)
        batch = make_flow_matching_batch(to_model_range(images), generator=generator)
        prediction = model(
            batch.x_t.to(device), t_to_model_timestep(batch.t).to(device), class_labels=labels.to(device)
        ).sample
        loss = flow_matching_loss(prediction, batch.velocity.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    scores = compute_layer_importance(model, adapter_names=[PROBE_ADAPTER])
    del model, optimizer
    return scores


def block_of(name: str) -> str:
    """The U-Net part a module name belongs to: "in", "down", "mid", "up", "out" (or "other")."""
    if name.startswith("conv_in"):
        return "in"
    if name.startswith("down_blocks"):
        return "down"
    if name.startswith("mid_block"):
        return "mid"
    if name.startswith("up_blocks"):
        return "up"
    if name.startswith("conv_out"):
        return "out"
    return "other"


BLOCK_COLORS = {"in": "#7f7f7f", "down": "#1f77b4", "mid": "#9467bd", "up": "#ff7f0e", "out": "#7f7f7f"}


def plot_layer_importance(
    scores: dict[str, float],
    path: str | Path | None = None,
    *,
    selected: Sequence[str] = (),
    ax=None,
    title: str | None = None,
):
    """Bar plot of |I_l| per layer in U-Net order, bars coloured by part (in / down / mid / up / out).

    Selected layers (e.g. `select_target_modules`'s result) are drawn solid, the others hatched and faded. Writes a
    PNG to `path` when given; returns the matplotlib figure.
    """
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = list(scores)
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(names) + 2), 3.6))
    else:
        fig = ax.figure
    chosen = set(selected)
    for j, name in enumerate(names):
        part = block_of(name)
        ax.bar(
            j,
            abs(scores[name]),
            color=BLOCK_COLORS.get(part, "#2ca02c"),
            alpha=1.0 if (not chosen or name in chosen) else 0.35,
            hatch=None if (not chosen or name in chosen) else "//",
            edgecolor="black" if name in chosen else "none",
            linewidth=0.6,
        )
    # Part boundaries and labels along the top.
    parts = [block_of(n) for n in names]
    start = 0
    for j in range(1, len(names) + 1):
        if j == len(names) or parts[j] != parts[start]:
            if start > 0:
                ax.axvline(start - 0.5, color="black", linewidth=0.5, linestyle=":")
            ax.text(
                (start + j - 1) / 2, 1.01, parts[start], transform=ax.get_xaxis_transform(), ha="center", va="bottom"
            )
            start = j
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(range(len(names)), fontsize=6)
    ax.set_xlabel("conv layer index (U-Net order)")
    ax.set_ylabel("|I_l|, mean rescaling F")
    handles = [Patch(color=BLOCK_COLORS[p], label=p) for p in ("down", "mid", "up")]
    if chosen:
        handles.append(Patch(facecolor="white", edgecolor="black", label=f"selected ({len(chosen)})"))
    ax.legend(handles=handles, fontsize=7, loc="upper left")
    if title:
        ax.set_title(title, pad=16)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
