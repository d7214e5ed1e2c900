"""Model-level FunLoRA: injection into the convs of a UNet, per-sample class routing, merging and safe loading."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from diffusers import UNet2DModel
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.utils import _get_submodules
from torch import nn

from .config import FunLoRAConfig
from .layer import Conv2d, FunLoRALayer, RoutingPlan


def _conv_names(model: nn.Module) -> list[str]:
    """Names of the convs FunLoRA can adapt: plain `nn.Conv2d`s and already wrapped ones, in module order."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, FunLoRALayer):
            names.append(name)
        elif isinstance(module, nn.Conv2d) and not name.endswith(".base_layer"):
            names.append(name)
    return names


class FunLoRAModel(BaseTuner):
    """Injects FunLoRA adapters into the `nn.Conv2d` layers of a model (e.g. a diffusers `UNet2DModel`).

    Each adapter is one task and owns the classes of its `FunLoRAConfig.class_ids`. A forward pre-hook on the model
    takes `class_labels` (global class ids, `(batch,)`) out of the call, so the UNet itself never sees them, and routes
    every sample to its class's row in whichever adapter owns it: a batch may mix classes of all loaded adapters, in
    training and in inference. The active adapter (`set_adapter`) only decides which tensors are trainable.

    Example:

        ```py
        >>> import funlora_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(unet, funlora_peft.FunLoRAConfig(class_ids=[0, 1]), adapter_name="task_0")
        >>> model.add_adapter("task_1", funlora_peft.FunLoRAConfig(class_ids=[2, 3]))
        >>> model.set_adapter("task_1")  # only task_1's tensors require grad
        >>> out = model(x_t, timestep, class_labels=torch.tensor([0, 3, 2, 1])).sample
        ```
    """

    prefix: str = "funlora_"
    tuner_layer_cls = FunLoRALayer
    target_module_mapping: dict = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self._class_table_key = None
        self._class_table: dict[int, tuple[str, int]] = {}
        # Registered after injection; removed again by merge_and_unload / unload.
        self._routing_hook = self.model.register_forward_pre_hook(self._route_class_labels, with_kwargs=True)
        self._restore_hook = self.model.register_forward_hook(self._restore_sample_order)
        self._output_inverse: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------------------------------
    # Injection

    def _prepare_adapter_config(self, peft_config: FunLoRAConfig, model_config: dict) -> FunLoRAConfig:
        """Default `target_modules` to every conv, and check the targets before anything is replaced."""
        convs = _conv_names(self.model)
        if peft_config.target_modules is None:
            peft_config.target_modules = list(convs)
        matched, not_convs = [], []
        conv_set = set(convs)
        adapter_parts = tuple(f".{p}" for p in FunLoRALayer.adapter_layer_names)
        for name, _ in self.model.named_modules():
            if not name or name.endswith(".base_layer") or any(part in name for part in adapter_parts):
                continue
            result = check_target_module_exists(peft_config, name)
            if result and not _is_excluded(result):
                (matched if name in conv_set else not_convs).append(name)
        # Containers that merely hold convs (e.g. a block matched by a broad regex) are not errors; other leaves are.
        not_convs = [n for n in not_convs if not list(self.model.get_submodule(n).children())]
        if not_convs:
            raise ValueError(
                f"`target_modules`={peft_config.target_modules!r} matches modules that are not nn.Conv2d: "
                f"{not_convs[:5]}; FunLoRA adapts convs only. Narrow `target_modules` or list them in "
                "`exclude_modules`."
            )
        if not matched:
            raise ValueError(
                f"`target_modules`={peft_config.target_modules!r} (exclude_modules={peft_config.exclude_modules!r}) "
                f"matches no nn.Conv2d of the model. Its convs are named e.g. {convs[:4]}; pass names like these, or "
                "leave target_modules=None to adapt every conv."
            )
        return peft_config

    def _check_new_adapter_config(self, config: FunLoRAConfig) -> None:
        """Refuse an adapter whose class ids are already owned by another adapter."""
        super()._check_new_adapter_config(config)
        new_ids = set(config.class_ids)
        for name, other in self.peft_config.items():
            if other is config:
                continue
            clash = sorted(new_ids & set(other.class_ids))
            if clash:
                raise ValueError(
                    f"Class ids {clash} are already owned by adapter {name!r}; every class belongs to exactly one "
                    "adapter. Give the new adapter other `class_ids`."
                )

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, FunLoRALayer):
            target.update_layer(adapter_name, peft_config, layer_key=current_key)
            if adapter_name not in self.active_adapters:
                target.set_adapter(self.active_adapters)
            return
        new_module = Conv2d(target, adapter_name, peft_config, layer_key=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        setattr(parent, target_name, new_module)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if self.prefix not in name:
                param.requires_grad = False
        for module in model.modules():
            if isinstance(module, FunLoRALayer):
                module.set_adapter(module.active_adapters)

    # ----------------------------------------------------------------------------------------------------------------
    # Routing

    def _funlora_layers(self) -> list[FunLoRALayer]:
        return [m for m in self.model.modules() if isinstance(m, FunLoRALayer)]

    def class_table(self) -> dict[int, tuple[str, int]]:
        """`{class_id: (adapter_name, row)}` over all loaded adapters."""
        key = tuple((name, tuple(cfg.class_ids)) for name, cfg in self.peft_config.items())
        if key != self._class_table_key:
            table = {}
            for name, cfg in self.peft_config.items():
                for row, class_id in enumerate(cfg.class_ids):
                    table[class_id] = (name, row)
            self._class_table, self._class_table_key = table, key
        return self._class_table

    @property
    def class_ids(self) -> list[int]:
        """Every class id served by the loaded adapters, sorted."""
        return sorted(self.class_table())

    def routing_plan(self, class_labels, batch_size: int) -> RoutingPlan:
        """Validate `class_labels` and group the batch by class; see `RoutingPlan`."""
        labels = _as_label_tensor(class_labels, batch_size)
        table = self.class_table()
        unique, counts = torch.unique(labels, return_counts=True)
        unknown = [c for c in unique.tolist() if c not in table]
        if unknown:
            raise ValueError(
                f"class_labels contains {unknown}, which no loaded adapter owns. Known class ids: {sorted(table)}. "
                "Load the adapter of the task that owns them (e.g. `load_adapter`)."
            )
        # Order the classes by adapter (in loading order), then by row, so each adapter's rows are contiguous.
        adapter_order = {name: i for i, name in enumerate(self.peft_config)}
        entries = sorted(
            zip(unique.tolist(), counts.tolist()),
            key=lambda e: (adapter_order[table[e[0]][0]], table[e[0]][1]),
        )
        groups: dict[str, list[int]] = {}
        for class_id, _ in entries:
            name, row = table[class_id]
            groups.setdefault(name, []).append(row)
        device = self._adapter_device()
        group_list = [(name, torch.tensor(rows, device=device)) for name, rows in groups.items()]
        ordered_counts = [count for _, count in entries]
        if len(entries) == 1:
            return RoutingPlan(labels, group_list, ordered_counts, None, None, entries[0][0])
        position = {class_id: i for i, (class_id, _) in enumerate(entries)}
        keys = torch.tensor([position[c] for c in labels.tolist()])
        perm = torch.argsort(keys, stable=True)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel())
        return RoutingPlan(labels, group_list, ordered_counts, perm.to(device), inverse.to(device), None)

    def _adapter_device(self) -> torch.device:
        for layer in self._funlora_layers():
            return layer.get_base_layer().weight.device
        return torch.device("cpu")

    def _route_class_labels(self, module, args, kwargs):
        """Forward pre-hook of the wrapped model: take `class_labels` out of the call and route them to the layers."""
        self._output_inverse = None  # a previous forward may have raised before restoring the order
        class_labels = kwargs.pop("class_labels", None)
        if class_labels is None and len(args) > 2:
            # UNet2DModel.forward(sample, timestep, class_labels, ...): the labels may come positionally.
            class_labels, args = args[2], args[:2] + args[3:]
        layers = self._funlora_layers()
        if not layers or all(layer.disable_adapters for layer in layers):
            for layer in layers:
                layer._routing = None
            return args, kwargs
        if class_labels is None:
            raise ValueError(
                "`class_labels` is missing: FunLoRA conditions on the class, so pass one label per sample, e.g. "
                "model(x_t, timestep, class_labels=labels). For the base model's output use "
                "`with model.disable_adapter(): ...`."
            )
        sample = args[0] if args else kwargs.get("sample")
        plan = self.routing_plan(class_labels, batch_size=sample.shape[0])
        if plan.perm is not None and isinstance(module, UNet2DModel):
            # Every op of a UNet2DModel treats samples independently, so the batch can be grouped by class once here
            # (and restored once in `_restore_sample_order`) rather than at every adapted conv.
            args, kwargs = _reorder_unet_inputs(args, kwargs, plan.perm)
            self._output_inverse = plan.inverse
            plan = dataclasses.replace(plan, perm=None, inverse=None)
        for layer in layers:
            layer._routing = plan
        return args, kwargs

    def _restore_sample_order(self, module, args, output):
        """Forward hook of the wrapped model: undo the grouping by class of `_route_class_labels`."""
        inverse, self._output_inverse = self._output_inverse, None
        if inverse is None:
            return output
        if isinstance(output, tuple):
            return (output[0].index_select(0, inverse),) + output[1:]
        output.sample = output.sample.index_select(0, inverse)
        return output

    # ----------------------------------------------------------------------------------------------------------------
    # Merging and unloading

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False, class_label: int | None = None) -> None:
        """Write W_y of `class_label` into every adapted conv (a batch of that class then runs at plain-UNet cost)."""
        owner = self._owner_of(class_label)
        for layer in self._funlora_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=[owner], class_label=class_label)

    def unmerge_adapter(self) -> None:
        """Restore every conv's W0 bit-exactly."""
        for layer in self._funlora_layers():
            layer.unmerge()

    def _owner_of(self, class_label) -> str:
        if class_label is None:
            raise ValueError(
                "FunLoRA merges one class at a time: pass `class_label`, e.g. merge_and_unload(class_label=3)."
            )
        table = self.class_table()
        if isinstance(class_label, torch.Tensor):
            class_label = class_label.item()
        if int(class_label) not in table:
            raise ValueError(
                f"class_label={class_label} is owned by no loaded adapter. Known class ids: {sorted(table)}."
            )
        return table[int(class_label)][0]

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None, class_label: int | None = None
    ) -> nn.Module:
        """Return the plain base model with W_y of `class_label` written into its convs (FunLoRA layers removed)."""
        owner = self._owner_of(class_label)
        return self._unload_and_optionally_merge(
            merge=True, safe_merge=safe_merge, class_label=class_label, owner=owner
        )

    def unload(self) -> nn.Module:
        """Return the base model with the FunLoRA layers removed and W0 untouched."""
        return self._unload_and_optionally_merge(merge=False)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None, **kw):
        if merge:
            self.unmerge_adapter()
        for key in [name for name, m in self.model.named_modules() if isinstance(m, FunLoRALayer)]:
            parent, target, target_name = _get_submodules(self.model, key)
            if merge:
                target.merge(safe_merge=safe_merge, adapter_names=[kw["owner"]], class_label=kw["class_label"])
                target._weight_before_merge = None  # the merged weight is now the base model's own
            setattr(parent, target_name, target.get_base_layer())
        self._routing_hook.remove()
        self._restore_hook.remove()
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    # ----------------------------------------------------------------------------------------------------------------
    # Loading: refuse a state dict that does not fit, and leave the model as it was

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        problem = check_adapter_state_dict(model, adapter_name, remapped)
        if problem is not None:
            _discard_adapter(model, adapter_name)
            raise ValueError(f"Cannot load adapter {adapter_name!r}: {problem} The model is left as it was.")
        return remapped


def check_adapter_state_dict(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> str | None:
    """The first reason `state_dict` cannot be loaded as `adapter_name` into `model`, or None when it fits.

    Keys may be as saved (`base_model.model.<conv>.funlora_a`) or as in the model (with the adapter name appended).
    Checks that every tensor maps to a FunLoRA tensor of an existing conv, that every such tensor is present, that
    shapes match, and that values are floating point and finite.
    """
    prefix, suffix = "base_model.model.", f".{adapter_name}"
    layer_parts = tuple(f".{p}." for p in FunLoRALayer.adapter_layer_names)

    def checkpoint_key(key: str) -> str:
        key = key.removesuffix(suffix) if key.rsplit(".", 1)[-1] == adapter_name else key
        return key if key.startswith(prefix) else prefix + key

    expected = {
        checkpoint_key(name): param
        for name, param in model.state_dict(keep_vars=True).items()
        if name.endswith(suffix) and any(part in name for part in layer_parts)
    }
    for key, tensor in state_dict.items():
        ckpt_key = checkpoint_key(key)
        layer, _, tensor_name = ckpt_key.removeprefix(prefix).rpartition(".")
        if ckpt_key not in expected:
            return (
                f"tensor {key!r} does not map to a FunLoRA tensor of an adapted conv of this model (layer {layer!r})."
            )
        target = expected[ckpt_key]
        if tuple(tensor.shape) != tuple(target.shape):
            return (
                f"layer {layer!r}: tensor {tensor_name} has shape {tuple(tensor.shape)} in the checkpoint but "
                f"{tuple(target.shape)} in the model; the adapter was saved for a differently shaped UNet."
            )
        if not tensor.dtype.is_floating_point:
            return f"tensor {key!r} has dtype {tensor.dtype}; FunLoRA tensors are floating point."
        if not torch.isfinite(tensor).all():
            return f"tensor {key!r} holds NaN or infinite values."
    missing = sorted(set(expected) - {checkpoint_key(key) for key in state_dict})
    if missing:
        return f"the checkpoint lacks {len(missing)} tensors the config asks for, e.g. {missing[0]!r}."
    return None


def _discard_adapter(peft_model: nn.Module, adapter_name: str) -> None:
    """Remove `adapter_name` after a failed load; unwrap the model entirely when it was the only adapter."""
    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(tuner, FunLoRAModel):
        return
    if list(tuner.peft_config) == [adapter_name]:
        tuner.unload()
        return
    for module in tuner.model.modules():
        if isinstance(module, FunLoRALayer):
            module.delete_adapter(adapter_name)
    del tuner.peft_config[adapter_name]
    if getattr(peft_model, "peft_config", None) is not None and adapter_name in peft_model.peft_config:
        del peft_model.peft_config[adapter_name]


def _reorder_unet_inputs(args: tuple, kwargs: dict, perm: torch.Tensor) -> tuple[tuple, dict]:
    """`UNet2DModel.forward(sample, timestep, ...)` inputs with the batch permuted by `perm`."""
    args, kwargs = list(args), dict(kwargs)
    for position, name in enumerate(("sample", "timestep")):
        container, key = (args, position) if len(args) > position else (kwargs, name)
        value = container[key] if (container is args or key in container) else None
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == perm.numel():
            container[key] = value.index_select(0, perm.to(value.device))
    return tuple(args), kwargs


def _is_excluded(result) -> bool:
    return type(result).__name__ == "_ExcludedModule"


def _as_label_tensor(class_labels, batch_size: int) -> torch.Tensor:
    """`(batch,)` int64 CPU tensor from a tensor, a list of ints or one int (broadcast to the batch)."""
    if isinstance(class_labels, bool):
        raise TypeError(f"class_labels must be integer class ids, got {class_labels!r}.")
    if isinstance(class_labels, int):
        return torch.full((batch_size,), class_labels, dtype=torch.long)
    if isinstance(class_labels, Sequence) and not isinstance(class_labels, str):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in class_labels):
            raise TypeError(f"class_labels must be integer class ids, got {list(class_labels)!r}.")
        class_labels = torch.tensor(list(class_labels), dtype=torch.long)
    if not isinstance(class_labels, torch.Tensor):
        raise TypeError(
            f"class_labels must be a tensor of shape (batch,), a list of ints or an int, got "
            f"{type(class_labels).__name__}."
        )
    if class_labels.dtype.is_floating_point or class_labels.dtype.is_complex or class_labels.dtype == torch.bool:
        raise TypeError(
            f"class_labels must hold integer class ids, got dtype {class_labels.dtype}; pass e.g. labels.long()."
        )
    if class_labels.ndim == 0:
        class_labels = class_labels.expand(batch_size)
    if class_labels.ndim != 1 or class_labels.shape[0] != batch_size:
        raise ValueError(
            f"class_labels must have shape ({batch_size},), one label per sample, got {tuple(class_labels.shape)}."
        )
    return class_labels.detach().to("cpu", torch.long)
