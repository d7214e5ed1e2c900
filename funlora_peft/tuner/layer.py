"""Per-layer FunLoRA math: per-class functional rescaling of the filters of an `nn.Conv2d`.

For each class y of an adapter and each adapted conv with frozen weight W0 `(out_channels, in_channels, s, s)`:

    F_y = (1/p) * sum_{i=1..p} alpha_{y,i} * f_i(a_y, b_y)        (out_channels, in_channels)
    W_y = W0 * (1 + F_y)[:, :, None, None]                         (the bias is unchanged)

A batch may mix classes of several adapters (tasks). The model lays the batch out class-interleaved (`RoutingPlan`),
and each layer builds the W_y of the C classes present in a few batched ops and runs ONE grouped convolution
(`groups = C`) over the whole batch (on the CPU, one batched matmul for wide, low-resolution convs): a pass costs
one convolution per conv whatever the number of classes in the batch or loaded, and a batch of one class costs
exactly one convolution with W_y (the same as a merged conv).
Without gradients (sampling) the stacked class weights are built once and reused until a parameter changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import FunLoRAConfig, layer_seed
from .functions import FunctionFamily, get_function


def as_class_id(value, argument: str = "class_label") -> int:
    """A class id as an int: a Python int, a numpy integer or a one-element integer tensor; floats and bools are
    refused with a TypeError naming `argument` (2.7 would otherwise silently become class 2)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(
                f"`{argument}` must be one integer class id, got a tensor of dtype {value.dtype} and shape "
                f"{tuple(value.shape)}."
            )
        return int(value.item())
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"`{argument}` must hold integer class ids, got {value!r} ({type(value).__name__}); a float would be "
            "truncated to another class."
        )
    return int(value)


def as_class_labels(class_labels, batch_size: int | None = None, argument: str = "class_labels") -> torch.Tensor:
    """`(batch,)` int64 CPU tensor of class ids from a tensor, a numpy array, a sequence of ints or one int.

    One int (or a 0-dim tensor) is broadcast to `batch_size`. Floats and bools are refused with a TypeError naming
    `argument`: a float label would otherwise be truncated to another class.
    """
    if isinstance(class_labels, (int, np.integer)) and not isinstance(class_labels, (bool, np.bool_)):
        if batch_size is None:
            raise ValueError(f"`{argument}` is one class id; pass one label per sample, e.g. [{class_labels}].")
        return torch.full((batch_size,), int(class_labels), dtype=torch.long)
    if isinstance(class_labels, np.ndarray):
        class_labels = torch.from_numpy(class_labels)
    elif isinstance(class_labels, Sequence) and not isinstance(class_labels, (str, bytes)):
        values = list(class_labels)
        if isinstance(class_labels, tuple) and len(values) == 0 or not values:
            raise ValueError(f"`{argument}` is empty: pass one class id per sample.")
        class_labels = torch.tensor([as_class_id(c, argument) for c in values], dtype=torch.long)
    if not isinstance(class_labels, torch.Tensor):
        raise TypeError(
            f"`{argument}` must be a tensor of shape (batch,), a list of ints or an int, got "
            f"{type(class_labels).__name__}: {class_labels!r}."
        )
    if class_labels.dtype.is_floating_point or class_labels.dtype.is_complex or class_labels.dtype == torch.bool:
        raise TypeError(
            f"`{argument}` must hold integer class ids, got dtype {class_labels.dtype}; pass e.g. labels.long()."
        )
    if class_labels.ndim == 0 and batch_size is not None:
        class_labels = class_labels.expand(batch_size)
    if class_labels.ndim != 1 or (batch_size is not None and class_labels.shape[0] != batch_size):
        expected = f"({batch_size},), one label per sample" if batch_size is not None else "(batch,)"
        raise ValueError(f"`{argument}` must have shape {expected}, got {tuple(class_labels.shape)}.")
    return class_labels.detach().to("cpu", torch.long)


@dataclass
class RoutingGroup:
    """The classes of one adapter present in a batch.

    Attributes:
        adapter_name: the adapter (task) owning the classes.
        rows: `(classes_of_that_adapter,)` rows of the adapter's stacked per-class tensors, on the adapter's device.
        all_rows: the rows are every row of the adapter, in order (no gather needed).
    """

    adapter_name: str
    rows: torch.Tensor
    all_rows: bool


@dataclass
class RoutingPlan:
    """How the samples of one batch map to adapter rows; built once per forward by `FunLoRAModel`.

    The batch is laid out class-interleaved: slot `j * C + c` holds the j-th sample of the c-th class present, for C
    classes and `chunk` slots per class. Viewed as `(chunk, C * channels, height, width)`, a batch in this layout goes
    through ONE grouped convolution (`groups = C`) with the C class weights W_y stacked, whatever C is. A class with
    fewer than `chunk` samples has its last sample repeated in the empty slots (class-balanced batches need none).

    Attributes:
        class_labels: `(batch,)` global class id of every sample, in the caller's order (on the CPU).
        class_ids: the C classes present, in layout order (by adapter in loading order, then by row).
        groups: the classes of each adapter, in layout order.
        chunk: slots per class.
        gather: `(C * chunk,)` the caller's sample in each slot; None when the caller's batch is already laid out.
        scatter: `(batch,)` the slot of each of the caller's samples; None when `gather` is None.
        laid_out: the model moved the batch into the layout once for all layers (a `UNet2DModel`); otherwise every
            layer gathers and scatters its own input and output.
    """

    class_labels: torch.Tensor
    class_ids: list[int]
    groups: list[RoutingGroup]
    chunk: int
    gather: torch.Tensor | None
    scatter: torch.Tensor | None
    laid_out: bool = False

    @property
    def batch_size(self) -> int:
        return self.class_labels.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    @property
    def num_slots(self) -> int:
        return self.num_classes * self.chunk

    @property
    def single_class(self) -> int | None:
        """The class id when the batch holds one class, else None."""
        return self.class_ids[0] if len(self.class_ids) == 1 else None


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
        # The adapters whose tensors require grad, and those that never train (created with inference_mode=True).
        self._trainable_adapters: set[str] = set()
        self._frozen_adapters: set[str] = set()
        # Class weights built without gradients, with the key of what they were built from (`_cached_class_weights`).
        self._weight_cache: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None
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
        # PEFT's names for a layer's sizes (its conv layers define them too).
        self.in_features = base.in_channels
        self.out_features = base.out_channels
        # Read by PEFT's `disable_input_dtype_casting` (diffusers' layerwise casting): FunLoRA casts its own inputs.
        self.cast_input_dtype_enabled = True

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
            generator = torch.Generator().manual_seed(layer_seed(config.init_seed, layer_key))
        if config.inference_mode:
            self._frozen_adapters.add(adapter_name)
        # Only the new tensors get their flag here: the others keep theirs (linear in the number of adapters).
        trainable = adapter_name in self.active_adapters and adapter_name not in self._frozen_adapters
        kwargs = dict(dtype=torch.float32)  # drawn in fp32 whatever the base dtype, so the init does not depend on it
        a = torch.randn(num_classes, self.out_channels, generator=generator, **kwargs) * config.init_a_std
        b = torch.randn(num_classes, self.in_channels, generator=generator, **kwargs) * config.init_b_std
        tensors = {
            "funlora_a": a,
            "funlora_b": b,
            "funlora_alpha": torch.full((num_classes, p), float(config.init_alpha), **kwargs),
        }
        if family.uses_omega:
            tensors["funlora_omega"] = (config.init_omega * torch.arange(1, p + 1, **kwargs)).expand(num_classes, p)
        # Stored in the base weight's dtype (fp32 for float8 storage); PeftModel upcasts fp16 / bf16 adapters to fp32
        # unless `autocast_adapter_dtype=False` (`_cast_adapter_dtype`), as for PEFT's own tuners.
        dtype = weight.dtype if weight.dtype.is_floating_point and torch.finfo(weight.dtype).bits >= 16 else None
        for store_name, tensor in tensors.items():
            getattr(self, store_name)[adapter_name] = nn.Parameter(tensor.to(device, dtype).contiguous(), trainable)
        self.funlora_function[adapter_name] = family
        self.funlora_class_ids[adapter_name] = list(config.class_ids)
        (self._trainable_adapters.add if trainable else self._trainable_adapters.discard)(adapter_name)

    def _set_requires_grad(self, adapter_name: str, requires_grad: bool) -> None:
        for store in (self.funlora_a, self.funlora_b, self.funlora_alpha, self.funlora_omega):
            if adapter_name in store:
                store[adapter_name].requires_grad_(requires_grad)
        (self._trainable_adapters.add if requires_grad else self._trainable_adapters.discard)(adapter_name)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Make `adapter_names` the active adapters and their tensors the only trainable ones (PEFT's contract).

        Adapters created with `inference_mode=True` (e.g. loaded with `is_trainable=False`) stay frozen. Only the
        adapters whose flag changes are touched, so that adding adapters one by one stays linear in their number.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        wanted = set() if inference_mode else {n for n in names if n in self.funlora_a} - self._frozen_adapters
        for name in self._trainable_adapters ^ wanted:
            self._set_requires_grad(name, name in wanted)
        self._active_adapter = names

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._trainable_adapters.discard(adapter_name)
        self._frozen_adapters.discard(adapter_name)

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

    def _class_scales(self, plan: RoutingPlan) -> torch.Tensor:
        """1 + F_y for every class of the batch, in layout order: `(classes, out_channels, in_channels)`, fp32."""
        build, factors = self._scale_factors(plan)
        return build(*factors)

    def _scale_factors(self, plan: RoutingPlan) -> tuple[ClassScales, list[torch.Tensor]]:
        """The adapter tensors of the classes of the batch (rows gathered) and the function building 1 + F_y of them.

        The training path passes both to `_ClassConv2d`, which keeps the small factors for backward and rebuilds the
        `(classes, out, in)` scales from them rather than keeping them.
        """
        layout, factors = [], []
        for group in plan.groups:
            name = group.adapter_name
            if name not in self.funlora_a:
                layout.append((None, len(group.rows), 0))  # the adapter does not target this layer: W0 here
                continue
            tensors = [self.funlora_a[name], self.funlora_b[name], self.funlora_alpha[name]]
            if name in self.funlora_omega:
                tensors.append(self.funlora_omega[name])
            if not group.all_rows:
                tensors = [tensor[group.rows] for tensor in tensors]
            layout.append((self.funlora_function[name], len(group.rows), len(tensors)))
            factors += tensors
        return ClassScales(tuple(layout), self.out_channels, self.in_channels), factors

    def _class_weights(self, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stacked class weights W_y = W0 * scale_y `(classes * out, in, s, s)` and the repeated bias."""
        base = self.get_base_layer()
        weight = base.weight if torch.finfo(base.weight.dtype).bits >= 16 else base.weight.float()  # float8 storage
        bias = None if base.bias is None else base.bias.repeat(scales.shape[0])
        return _stack_class_weights(weight, scales), bias

    def _cached_class_weights(self, plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_class_weights` without gradients, built once and kept until a tensor it depends on changes.

        The key holds every tensor the weights are built from (W0, the bias and the adapters' tensors of the classes
        present) by identity and version counter: an optimizer step, `load_state_dict` or a merge changes a version
        or a tensor, so a stale weight is never used.
        """
        base = self.get_base_layer()
        tensors = [base.weight] + ([base.bias] if base.bias is not None else [])
        for group in plan.groups:
            for store in (self.funlora_a, self.funlora_b, self.funlora_alpha, self.funlora_omega):
                if group.adapter_name in store:
                    tensors.append(store[group.adapter_name])
        key = (
            # the classes by value (a CPU list): a plan rebuilt for the same labels (after a call with other labels
            # replaced the model's one-plan cache) has new row tensors but needs the same weights
            tuple(plan.class_ids),
            tuple(g.adapter_name for g in plan.groups),
            tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors),
        )
        if self._weight_cache is None or self._weight_cache[0] != key:
            with torch.autocast(base.weight.device.type, enabled=False):
                self._weight_cache = (key, *self._class_weights(self._class_scales(plan)))
        return self._weight_cache[1], self._weight_cache[2]

    def release_class_weights(self) -> None:
        """Free the class weights `_cached_class_weights` keeps; the next forward without gradients builds them."""
        self._weight_cache = None

    def get_delta_weight(self, adapter_name: str, class_label: int) -> torch.Tensor:
        """W_y - W0 = W0 * F_y for one class of `adapter_name`, in the dtype of W0."""
        row = self.funlora_class_ids[adapter_name].index(int(class_label))
        rows = torch.tensor([row], device=self.funlora_a[adapter_name].device)
        weight = self.unmerged_weight()
        delta = self.functional_matrix(adapter_name, rows)[0]
        acc = torch.promote_types(weight.dtype, torch.float32)
        return (weight.to(acc) * delta[:, :, None, None].to(acc)).to(weight.dtype)

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
        merged = self.merged_weight(owner, class_label)
        if safe_merge and merged is not None and not torch.isfinite(merged).all():
            raise ValueError(f"Merging class {class_label} of adapter {owner!r} gives non-finite weights.")
        self._write_merged(owner, class_label, merged)

    def unmerged_weight(self) -> torch.Tensor:
        """W0: the conv's weight, or, while a class is merged into it, the W0 kept aside to restore."""
        if self._weight_before_merge is not None:
            return self._weight_before_merge
        return self.get_base_layer().weight.detach()

    def merged_weight(self, adapter_name: str, class_label: int) -> torch.Tensor | None:
        """W_y of `class_label`, as the conv would hold it merged; None when `adapter_name` does not adapt this conv.

        Built from W0 even while another class is merged. Computed in at least fp32 and cast to the weight's dtype. A
        weight stored in a dtype of fewer than 16 bits (diffusers' layerwise casting to float8) is refused: the
        merged weight would be quantized to it.
        """
        if adapter_name not in self.funlora_a:
            return None
        weight = self.unmerged_weight()
        if weight.dtype.is_floating_point and torch.finfo(weight.dtype).bits < 16:
            raise ValueError(
                f"This conv stores its weight as {weight.dtype} (layerwise casting): a merged W_y would be quantized "
                "to it. Sample without merging (FunLoRAPipeline(..., merge_single_class=False)); the routed path "
                "builds W_y in the compute dtype."
            )
        acc = torch.promote_types(weight.dtype, torch.float32)
        return (weight.data.to(acc) + self.get_delta_weight(adapter_name, class_label).to(acc)).to(weight.dtype)

    def _write_merged(self, adapter_name: str, class_label: int, merged: torch.Tensor | None) -> None:
        """Put `merged` (from `merged_weight`) into the conv, keeping W0 to restore it bit-exactly."""
        if merged is not None:
            base = self.get_base_layer()
            # W0's own tensor, not a copy: `merged` is a new tensor, so W0 is untouched while merged, restoring it
            # costs no memory, and the cached class weights keyed on it stay valid across a merge and unmerge.
            self._weight_before_merge = base.weight.data
            base.weight.data = merged
        self.merged_adapters = [adapter_name]
        self._merged_class = int(class_label)

    def unmerge(self) -> None:
        """Restore W0 exactly as it was before `merge`."""
        if not self.merged:
            return
        if self._weight_before_merge is not None:
            self.get_base_layer().weight.data = self._weight_before_merge
        self._weight_before_merge = None
        self.merged_adapters = []
        self._merged_class = None


@dataclass(frozen=True, eq=False)
class ClassScales:
    """Builds 1 + F_y `(classes, out, in)` (fp32) from the adapter tensors of the classes of a batch, group by group.

    `layout` holds, per adapter group in layout order, its function family (None: the adapter does not target the
    layer, its classes get scale 1, i.e. W0), its number of classes and how many tensors it takes (a, b, alpha and,
    for `cos`, omega).
    """

    layout: tuple[tuple[FunctionFamily | None, int, int], ...]
    out_channels: int
    in_channels: int

    def __call__(self, *factors: torch.Tensor) -> torch.Tensor:
        scales, position = [], 0
        device = factors[0].device
        for family, classes, count in self.layout:
            if family is None:
                scales.append(torch.ones(classes, self.out_channels, self.in_channels, device=device))
            else:
                a, b, alpha, *omega = factors[position : position + count]
                scales.append(family.scales(a, b, alpha, omega[0] if omega else None))
                position += count
        return scales[0] if len(scales) == 1 else torch.cat(scales)


class _ClassConv2d(torch.autograd.Function):
    """One grouped convolution of a class-interleaved batch with the stacked class weights W_y = W0 * scale_y.

    `x` is `(chunk, classes * in, h, w)` (the class-interleaved batch viewed with the classes in the channels). Neither
    the weight `(classes * out, in, s, s)` nor the scales `(classes, out, in)` it is built from are kept for backward
    (for 10 classes the scales alone weigh as much as the backbone's weights): given `build_scales` and the classes'
    factors, it keeps the factors (out + in + 2p numbers per class) and backward rebuilds the scales and W_y.

    Under torch.compile, which cannot trace the `torch.autograd.grad` of that rebuild, the caller passes the `scales`
    instead (`build_scales` None, no factors); they are kept, and the compiler's partitioner decides what to recompute.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, conv_args, build_scales, scales, *factors):
        if build_scales is not None:
            with torch.no_grad():
                scales = build_scales(*factors)
            ctx.save_for_backward(x, weight, *factors)
        else:
            ctx.save_for_backward(x, weight, scales)
        classes, (stride, padding, dilation) = scales.shape[0], conv_args
        ctx.conv_args, ctx.has_bias, ctx.build_scales = conv_args, bias is not None, build_scales
        class_bias = None if bias is None else bias.repeat(classes)
        return _class_conv2d(x, _stack_class_weights(weight, scales), class_bias, stride, padding, dilation, classes)

    @staticmethod
    def backward(ctx, grad_out):
        need_x, need_weight, need_bias, _, _, need_kept_scales = ctx.needs_input_grad[:6]
        if ctx.build_scales is None:
            x, weight, scales = ctx.saved_tensors
            need_scales, factors = need_kept_scales, []
        else:
            x, weight, *factors = ctx.saved_tensors
            need_factors = ctx.needs_input_grad[6:]
            need_scales = any(need_factors)
            # The scales again, in the adapters' precision, with a graph to the factors that need a gradient.
            with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
                leaves = [factor.detach().requires_grad_(need) for factor, need in zip(factors, need_factors)]
                scales_graph = ctx.build_scales(*leaves)
            scales = scales_graph.detach()
        classes, (out_channels, in_channels, height, width) = scales.shape[0], weight.shape
        grad_x, grad_class_weight, grad_class_bias = _class_conv2d_backward(
            grad_out,
            x,
            _stack_class_weights(weight, scales),
            ctx.has_bias,
            ctx.conv_args,
            classes,
            (need_x, need_weight or need_scales, need_bias and ctx.has_bias),
        )
        grad_weight = grad_scales = grad_bias = None
        if need_weight or need_scales:
            # Accumulate in at least fp32 (bf16 / fp16 weights), in the weights' own precision when it is higher.
            acc = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
            per_class = grad_class_weight.to(acc).view(classes, out_channels, in_channels, height * width)
            if need_scales:
                kernel = weight.to(acc).view(1, out_channels, in_channels, height * width)
                grad_scales = (per_class * kernel).sum(dim=-1).to(scales.dtype)
            if need_weight:
                scaled = per_class * scales.to(acc).view(classes, out_channels, in_channels, 1)
                grad_weight = scaled.sum(dim=0).view(weight.shape).to(weight.dtype)
        if need_bias and ctx.has_bias:
            grad_bias = grad_class_bias.view(classes, out_channels).sum(dim=0)
        if ctx.build_scales is None:
            return grad_x, grad_weight, grad_bias, None, None, grad_scales
        grad_factors = [None] * len(factors)
        if need_scales:
            wanted = [index for index, leaf in enumerate(leaves) if leaf.requires_grad]
            grads = torch.autograd.grad(scales_graph, [leaves[index] for index in wanted], grad_scales)
            for index, grad in zip(wanted, grads):
                grad_factors[index] = grad
        return grad_x, grad_weight, grad_bias, None, None, None, *grad_factors


def _stack_class_weights(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W_y = W0 * scale_y for the classes of `scales` `(classes, out, in)`, stacked: `(classes * out, in, s, s)`."""
    classes, (out_channels, in_channels, height, width) = scales.shape[0], weight.shape
    kernel = weight.view(1, out_channels, in_channels, height * width)
    stacked = kernel * scales.to(weight.dtype).view(classes, out_channels, in_channels, 1)
    return stacked.view(classes * out_channels, in_channels, height, width)


# On the CPU, oneDNN's grouped convolution is slow when each group has a large kernel and few output positions (the
# low-resolution convs of a CIFAR-size UNet: 256 or 512 input channels at 4x4 or 8x8, where it takes 2x to 10x the
# time of the dense convolution with the same arithmetic). There one batched matmul over the classes of the unfolded
# input does the same product at about the dense convolution's speed (docs/method.md, "One grouped convolution").
_MATMUL_MIN_KERNEL = 2304  # in_channels * s * s of a class: 256 channels of a 3x3 conv
_MATMUL_MAX_POSITIONS = 64  # output positions of a class in the batch: chunk * height' * width'


def _output_size(x: torch.Tensor, weight: torch.Tensor, conv_args) -> tuple[int, int]:
    """Height and width of the convolution of `x` with `weight` (integer padding)."""
    stride, padding, dilation = conv_args
    return tuple(
        (size + 2 * pad - dil * (k - 1) - 1) // step + 1
        for size, pad, dil, k, step in zip(x.shape[2:], padding, dilation, weight.shape[2:], stride)
    )


def _uses_matmul(x: torch.Tensor, weight: torch.Tensor, classes: int, conv_args) -> bool:
    """Whether `_class_conv2d` takes the batched matmul for `x` `(chunk, classes * in, h, w)` (see above); the output
    size is computed only where the cheaper conditions hold (never on other devices)."""
    if x.device.type != "cpu" or classes == 1 or weight.shape[1:].numel() < _MATMUL_MIN_KERNEL:
        return False
    height, width = _output_size(x, weight, conv_args)
    return x.shape[0] * height * width <= _MATMUL_MAX_POSITIONS


def _class_columns(x: torch.Tensor, weight: torch.Tensor, classes: int, conv_args) -> torch.Tensor:
    """The unfolded input of each class of `x` `(chunk, classes * in, h, w)`: `(classes, in * s * s, chunk * h'w')`."""
    stride, padding, dilation = conv_args
    chunk = x.shape[0]
    columns = F.unfold(x.reshape(chunk * classes, -1, *x.shape[2:]), weight.shape[2:], dilation, padding, stride)
    columns = columns.view(chunk, classes, *columns.shape[1:]).permute(1, 2, 0, 3)
    return columns.reshape(classes, columns.shape[1], -1)


def _class_conv2d(x, weight, bias, stride, padding, dilation, classes: int) -> torch.Tensor:
    """The grouped convolution of a class-interleaved batch `x` `(chunk, classes * in, h, w)` with the stacked class
    weights `(classes * out, in, s, s)`: `F.conv2d(..., groups=classes)`, or, where that kernel is slow (CPU, large
    kernels, few positions: `_uses_matmul`), the same product as one batched matmul over the classes."""
    conv_args = (stride, padding, dilation)
    if not _uses_matmul(x, weight, classes, conv_args):
        return F.conv2d(x, weight, bias, stride, padding, dilation, classes)
    chunk, out_channels, out_size = x.shape[0], weight.shape[0] // classes, _output_size(x, weight, conv_args)
    columns = _class_columns(x, weight, classes, conv_args)
    out = torch.bmm(weight.reshape(classes, out_channels, -1), columns)  # (classes, out, chunk * positions)
    if bias is not None:
        out = out + bias.view(classes, out_channels, 1)
    out = out.view(classes, out_channels, chunk, *out_size).permute(2, 0, 1, 3, 4)
    return out.reshape(chunk, classes * out_channels, *out_size)


def _class_conv2d_backward(grad_out, x, weight, has_bias: bool, conv_args, classes: int, output_mask):
    """The gradients of `_class_conv2d` to `x`, the stacked weights and the bias (None where `output_mask` is off)."""
    stride, padding, dilation = conv_args
    if not _uses_matmul(x, weight, classes, conv_args):
        return torch.ops.aten.convolution_backward(
            grad_out,
            x,
            weight,
            [weight.shape[0]] if has_bias else None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            classes,
            list(output_mask),
        )
    need_x, need_weight, need_bias = output_mask
    chunk, out_channels = x.shape[0], weight.shape[0] // classes
    # (chunk, classes * out, h', w') -> (classes, out, chunk * positions): the layout of the forward's product
    grad = grad_out.reshape(chunk, classes, out_channels, -1).permute(1, 2, 0, 3).reshape(classes, out_channels, -1)
    grad_x = grad_weight = grad_bias = None
    if need_weight:
        columns = _class_columns(x, weight, classes, conv_args)
        grad_weight = torch.bmm(grad, columns.transpose(1, 2)).view(weight.shape)
    if need_bias:
        grad_bias = grad.sum(dim=-1).view(-1)
    if need_x:
        grad_columns = torch.bmm(weight.reshape(classes, out_channels, -1).transpose(1, 2), grad)
        kernel = grad_columns.shape[1]
        grad_columns = grad_columns.view(classes, kernel, chunk, -1).permute(2, 0, 1, 3)
        grad_columns = grad_columns.reshape(chunk * classes, kernel, -1)
        grad_x = F.fold(grad_columns, x.shape[2:], weight.shape[2:], dilation, padding, stride).view(x.shape)
    return grad_x, grad_weight, grad_bias


def _explicit_padding(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """`x` and the integer padding for `F.conv2d` that pad `x` exactly as `conv` does.

    A grouped convolution's backward (`convolution_backward`) takes integer paddings only: "valid" is 0, a symmetric
    "same" its half-kernel, and an asymmetric "same" (even kernels) or a reflect / replicate / circular mode become an
    explicit, differentiable `F.pad` of the input, as nn.Conv2d does for the modes.
    """
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0, 0)
    if conv.padding == "valid":
        return x, (0, 0)
    if conv.padding == "same":
        left, right, top, bottom = conv._reversed_padding_repeated_twice
        if left == right and top == bottom:
            return x, (top, left)
        return F.pad(x, conv._reversed_padding_repeated_twice), (0, 0)
    return x, tuple(conv.padding)


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
                f"Class {self._merged_class} is merged into the convs, but the batch holds classes {plan.class_ids}; "
                "call unmerge_adapter() to route mixed batches."
            )
        if plan is None and not self.funlora_a:
            return self.base_layer(x, *args, **kwargs)  # every adapter deleted: the plain conv
        if plan is None:
            raise RuntimeError(
                "This FunLoRA layer received no class labels: call the model with `class_labels=...`, or use "
                "`with model.disable_adapter():` for the base output."
            )
        expected = plan.num_slots if plan.laid_out else plan.batch_size
        if x.shape[0] != expected:
            raise ValueError(
                f"class_labels has {plan.batch_size} entries but the layer received a batch of {x.shape[0]}; pass one "
                "label per sample."
            )
        if all(group.adapter_name not in self.funlora_a for group in plan.groups):
            # No class of the batch is adapted here: the plain conv, exactly as if this layer were not wrapped (a
            # task that adapts only some layers gives the same outputs whatever other tasks are loaded).
            return self.base_layer(x, *args, **kwargs)
        if not plan.laid_out and plan.gather is not None:
            x = x.index_select(0, plan.gather)
        base = self.get_base_layer()
        x, padding = _explicit_padding(base, x)
        classes = plan.num_classes
        grouped = x.reshape(plan.chunk, classes * self.in_channels, *x.shape[2:])  # the classes in the channels
        # The conv's compute dtype: autocast's, else the input's when the weight is stored in fewer bits (diffusers'
        # layerwise casting keeps float8 weights and casts them for each forward), else the weight's own.
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        elif torch.finfo(base.weight.dtype).bits < 16:
            dtype = x.dtype
        else:
            dtype = base.weight.dtype
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self.release_class_weights()  # a training step makes the sampling weights stale: free them now
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # (a compiled graph fuses the weight build)
            weight, bias = base.weight.to(dtype), base.bias
            bias = None if bias is None else bias.to(dtype)
            conv_args = (base.stride, padding, base.dilation)
            # F_y in the adapters' precision (fp32); the casts are differentiable
            with torch.autocast(x.device.type, enabled=False):
                if torch.compiler.is_compiling():
                    build_scales, scales, factors = None, self._class_scales(plan), []
                else:
                    (build_scales, factors), scales = self._scale_factors(plan), None
                out = _ClassConv2d.apply(grouped.to(dtype), weight, bias, conv_args, build_scales, scales, *factors)
        else:
            weight, bias = self._cached_class_weights(plan)
            if weight.dtype != dtype:
                weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
            out = _class_conv2d(grouped.to(dtype), weight, bias, base.stride, padding, base.dilation, classes)
        out = out.reshape(plan.chunk * classes, self.out_channels, *out.shape[2:])
        if not plan.laid_out and plan.scatter is not None:
            out = out.index_select(0, plan.scatter)
        return out

    def __repr__(self) -> str:
        return "funlora." + super().__repr__()
