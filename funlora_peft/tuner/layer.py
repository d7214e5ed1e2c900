"""Per-layer FunLoRA math: per-class functional rescaling of the filters of an `nn.Conv2d`.

For each class y of an adapter and each adapted conv with frozen weight W0 `(out_channels, in_channels, s, s)`:

    F_y = (1/p) * sum_{i=1..p} alpha_{y,i} * f_i(a_y, b_y)        (out_channels, in_channels)
    W_y = W0 * (1 + F_y)[:, :, None, None]                         (the bias is unchanged)

A batch may mix classes of several adapters (tasks). The layer builds W_y once per class present in the batch and
convolves each class's samples with it, so a batch costs about one convolution whatever the number of classes loaded,
and a batch of one class costs exactly one convolution with W_y (the same as a merged conv).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import FunLoRAConfig
from .functions import FunctionFamily, get_function


@dataclass
class RoutingPlan:
    """How the samples of one batch map to adapter rows; built once per forward by `FunLoRAModel`.

    Attributes:
        class_labels: `(batch,)` global class id of every sample (on the CPU).
        groups: `(adapter_name, rows)` pairs in processing order; `rows` `(classes_of_that_adapter,)` indexes the
            adapter's stacked per-class tensors, on the adapter's device.
        counts: number of samples of each class present, in the order of the concatenated `rows`.
        perm: `(batch,)` sample order that puts the classes in that order; None when the batch holds one class.
        inverse: `(batch,)` the inverse permutation of `perm`; None when the batch holds one class.
        single_class: the class id when the batch holds one class, else None.
    """

    class_labels: torch.Tensor
    groups: list[tuple[str, torch.Tensor]]
    counts: list[int]
    perm: torch.Tensor | None
    inverse: torch.Tensor | None
    single_class: int | None

    @property
    def batch_size(self) -> int:
        return self.class_labels.shape[0]


class FunLoRALayer(BaseTunerLayer):
    """Owns the per-adapter FunLoRA tensors of one conv layer; each adapter stacks one row per class.

    Tensors (keyed by adapter name), with `n` the number of classes of the adapter:
        funlora_a: `(n, out_channels)`, funlora_b: `(n, in_channels)`, funlora_alpha: `(n, p)`,
        funlora_omega: `(n, p)` (only for `cos`).
    """

    adapter_layer_names: tuple[str, ...] = ("funlora_a", "funlora_b", "funlora_alpha", "funlora_omega")
    other_param_names: tuple[str, ...] = ("funlora_function", "funlora_class_ids")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.funlora_a = nn.ParameterDict({})
        self.funlora_b = nn.ParameterDict({})
        self.funlora_alpha = nn.ParameterDict({})
        self.funlora_omega = nn.ParameterDict({})
        self.funlora_function: dict[str, FunctionFamily] = {}
        self.funlora_class_ids: dict[str, list[int]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # The batch's routing, set by the model's forward pre-hook. It stays valid until the next forward, so that
        # gradient checkpointing can recompute this layer during backward().
        self._routing: RoutingPlan | None = None
        self._merged_class: int | None = None
        self._weight_before_merge: torch.Tensor | None = None
        self.kwargs = kwargs

        base = self.get_base_layer()
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"FunLoRA adapts nn.Conv2d layers only, got {type(base).__name__}.")
        if base.groups != 1:
            raise ValueError(
                f"FunLoRA needs a dense conv (groups=1), got groups={base.groups}; exclude this layer with "
                "`exclude_modules`."
            )
        self.in_channels = base.in_channels
        self.out_channels = base.out_channels

    def update_layer(self, adapter_name: str, config: FunLoRAConfig, layer_key: str = "") -> None:
        """Create the tensors of `adapter_name`: one row per class of `config.class_ids`.

        a and b are drawn from N(0, init_a_std^2) and N(0, init_b_std^2), alpha is `init_alpha` (0: identity at init)
        and, for `cos`, omega_i = init_omega * i.
        """
        family = get_function(config.function)
        num_classes, p = len(config.class_ids), config.num_functions
        weight = self.get_base_layer().weight
        device = weight.device if weight.device.type != "meta" else None
        generator = None
        if config.init_seed is not None:
            # A per-layer seed, so that layers of equal shape do not start from the same factors.
            generator = torch.Generator().manual_seed(config.init_seed * 1_000_003 + zlib.crc32(layer_key.encode()))
        kwargs = dict(dtype=torch.float32)
        a = torch.randn(num_classes, self.out_channels, generator=generator, **kwargs) * config.init_a_std
        b = torch.randn(num_classes, self.in_channels, generator=generator, **kwargs) * config.init_b_std
        alpha = torch.full((num_classes, p), float(config.init_alpha), **kwargs)
        self.funlora_a[adapter_name] = nn.Parameter(a.to(device))
        self.funlora_b[adapter_name] = nn.Parameter(b.to(device))
        self.funlora_alpha[adapter_name] = nn.Parameter(alpha.to(device))
        if family.uses_omega:
            omega = config.init_omega * torch.arange(1, p + 1, **kwargs).repeat(num_classes, 1)
            self.funlora_omega[adapter_name] = nn.Parameter(omega.to(device))
        self.funlora_function[adapter_name] = family
        self.funlora_class_ids[adapter_name] = list(config.class_ids)
        self.set_adapter(self.active_adapters)

    # ----------------------------------------------------------------------------------------------------------------
    # The functional matrix and the per-class weights

    def functional_matrix(self, adapter_name: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """F_y for the given rows (classes) of `adapter_name`: `(len(rows), out_channels, in_channels)`, fp32."""
        a, b = self.funlora_a[adapter_name], self.funlora_b[adapter_name]
        alpha = self.funlora_alpha[adapter_name]
        omega = self.funlora_omega[adapter_name] if adapter_name in self.funlora_omega else None
        if rows is not None:
            a, b, alpha = a[rows], b[rows], alpha[rows]
            omega = omega[rows] if omega is not None else None
        return self.funlora_function[adapter_name].compute(a, b, alpha, omega)

    def _class_scales(self, groups: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """1 + F_y for every class of the routing groups, in order: `(classes, out_channels, in_channels)`, fp32."""
        scales = []
        for adapter_name, rows in groups:
            if adapter_name not in self.funlora_a:
                # The adapter does not target this layer: its classes use W0 here.
                scales.append(torch.ones(rows.shape[0], self.out_channels, self.in_channels, device=rows.device))
            else:
                scales.append(1.0 + self.functional_matrix(adapter_name, rows))
        return scales[0] if len(scales) == 1 else torch.cat(scales)

    def get_delta_weight(self, adapter_name: str, class_label: int) -> torch.Tensor:
        """W_y - W0 = W0 * F_y for one class of `adapter_name`, in the dtype of W0."""
        row = self.funlora_class_ids[adapter_name].index(int(class_label))
        rows = torch.tensor([row], device=self.funlora_a[adapter_name].device)
        weight = self.get_base_layer().weight
        delta = self.functional_matrix(adapter_name, rows)[0]
        return (weight.float() * delta[:, :, None, None]).to(weight.dtype)

    # ----------------------------------------------------------------------------------------------------------------
    # Merging one class into the conv

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None, class_label=None) -> None:
        """Write W_y of `class_label` into the conv weight; the original W0 is kept to restore it bit-exactly.

        `adapter_names` must name the adapter owning the class (the model passes it); when that adapter does not
        target this layer, W0 is left as it is.
        """
        if class_label is None:
            raise ValueError(
                "FunLoRA merges one class at a time: pass `class_label`, e.g. merge_adapter(class_label=3)."
            )
        class_label = int(class_label)
        if self.merged:
            if self._merged_class == class_label:
                return
            raise ValueError(
                f"Class {self._merged_class} is already merged into this layer; call unmerge_adapter() before "
                f"merging class {class_label}."
            )
        if not adapter_names:
            raise ValueError(f"`adapter_names` must name the adapter that owns class {class_label}.")
        owner = adapter_names[0]
        base = self.get_base_layer()
        if owner in self.funlora_a:
            merged = base.weight.data + self.get_delta_weight(owner, class_label)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"Merging class {class_label} of adapter {owner!r} gives non-finite weights.")
            self._weight_before_merge = base.weight.data.clone()
            base.weight.data = merged
        self.merged_adapters = [owner]
        self._merged_class = class_label

    def unmerge(self) -> None:
        """Restore W0 exactly as it was before `merge`."""
        if not self.merged:
            return
        if self._weight_before_merge is not None:
            self.get_base_layer().weight.data = self._weight_before_merge
        self._weight_before_merge = None
        self.merged_adapters = []
        self._merged_class = None


class _PerClassConv2d(torch.autograd.Function):
    """Convolve consecutive chunks of a batch, one per class, with W_y = W0 * scale_y.

    Autograd would keep one full weight copy per class and conv for the backward pass; this function keeps only the
    scales `(classes, out, in)` (a kernel's area smaller) and rebuilds each W_y in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scales, counts, stride, padding, dilation):
        outs = []
        for chunk, scale in zip(x.split(counts), scales):
            class_weight = weight * scale[:, :, None, None].to(weight.dtype)
            outs.append(torch.nn.functional.conv2d(chunk, class_weight, bias, stride, padding, dilation))
        ctx.save_for_backward(x, weight, scales)
        ctx.counts, ctx.conv_args, ctx.has_bias = counts, (stride, padding, dilation), bias is not None
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, scales = ctx.saved_tensors
        need_x, need_weight, need_bias, need_scales = ctx.needs_input_grad[:4]
        stride, padding, dilation = ctx.conv_args
        grad_x, grad_scales = [], []
        # Accumulate in at least fp32 (bf16 / fp16 weights), in the weights' own precision when it is higher.
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight else None
        for chunk, grad, scale in zip(x.split(ctx.counts), grad_out.split(ctx.counts), scales):
            scale = scale[:, :, None, None]
            class_weight = weight * scale.to(weight.dtype)
            gx, gw, _ = torch.ops.aten.convolution_backward(
                grad,
                chunk,
                class_weight,
                None,
                stride,
                padding,
                dilation,
                False,
                [0, 0],
                1,
                [need_x, need_weight or need_scales, False],
            )
            if need_x:
                grad_x.append(gx)
            if need_scales:
                grad_scales.append((gw.to(acc) * weight.to(acc)).sum(dim=(-1, -2)))
            if need_weight:
                grad_weight += gw.to(acc) * scale
        return (
            torch.cat(grad_x) if need_x else None,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_out.sum(dim=(0, 2, 3)) if need_bias and ctx.has_bias else None,
            torch.stack(grad_scales).to(scales.dtype) if need_scales else None,
            None,
            None,
            None,
            None,
        )


class Conv2d(nn.Module, FunLoRALayer):
    """An `nn.Conv2d` wrapped with FunLoRA adapters; routes every sample to the adapter row of its class."""

    def __init__(self, base_layer: nn.Conv2d, adapter_name: str, config: FunLoRAConfig, layer_key: str = "", **kwargs):
        super().__init__()
        FunLoRALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, layer_key=layer_key)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """`x` `(batch, in_channels, height, width)` -> `(batch, out_channels, height', width')`."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        plan = self._routing
        if self.merged:
            if plan is None or plan.single_class == self._merged_class:
                return self.base_layer(x, *args, **kwargs)
            raise ValueError(
                f"Class {self._merged_class} is merged into the convs, but the batch holds classes "
                f"{sorted(set(plan.class_labels.tolist()))}; call unmerge_adapter() to route mixed batches."
            )
        if plan is None:
            raise RuntimeError(
                "This FunLoRA layer received no class labels: call the model with `class_labels=...`, or use "
                "`with model.disable_adapter():` for the base output."
            )
        if plan.batch_size != x.shape[0]:
            raise ValueError(
                f"class_labels has {plan.batch_size} entries but the layer received a batch of {x.shape[0]}; pass one "
                "label per sample."
            )
        if all(adapter_name not in self.funlora_a for adapter_name, _ in plan.groups):
            # No class of the batch is adapted here: the plain conv, exactly as if this layer were not wrapped (a
            # task that adapts only some layers gives the same outputs whatever other tasks are loaded).
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        scales = self._class_scales(plan.groups)
        if len(plan.counts) == 1:
            return base._conv_forward(x, base.weight * scales[0, :, :, None, None].to(base.weight.dtype), base.bias)
        if plan.perm is not None:
            x = x.index_select(0, plan.perm)
        if base.padding_mode == "zeros" and not torch.is_autocast_enabled(x.device.type):
            out = _PerClassConv2d.apply(
                x, base.weight, base.bias, scales, plan.counts, base.stride, base.padding, base.dilation
            )
        else:
            weights = base.weight.unsqueeze(0) * scales[:, :, :, None, None].to(base.weight.dtype)
            out = torch.cat([base._conv_forward(c, w, base.bias) for c, w in zip(x.split(plan.counts), weights)])
        return out if plan.perm is None else out.index_select(0, plan.inverse)

    def __repr__(self) -> str:
        return "funlora." + super().__repr__()
