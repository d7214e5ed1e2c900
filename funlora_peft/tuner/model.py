"""Model-level FunLoRA: injection into the convs of a UNet, per-sample class routing, merging and safe loading."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Sequence

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DModel
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.utils import _get_submodules
from torch import nn

from .config import FunLoRAConfig
from .layer import Conv2d, FunLoRALayer, RoutingGroup, RoutingPlan


def _conv_groups(module: nn.Module) -> int:
    conv = module.get_base_layer() if isinstance(module, FunLoRALayer) else module
    return conv.groups


def _adaptable_convs(model: nn.Module, include_grouped: bool = False) -> list[tuple[str, nn.Module]]:
    """`(name, module)` of the convs FunLoRA can adapt, in module order: plain dense `nn.Conv2d`s and already wrapped
    ones; grouped convs (`groups > 1`, e.g. depthwise) only with `include_grouped`."""
    convs = []
    for name, module in model.named_modules():
        if isinstance(module, FunLoRALayer) or (isinstance(module, nn.Conv2d) and not name.endswith(".base_layer")):
            if include_grouped or _conv_groups(module) == 1:
                convs.append((name, module))
    return convs


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
    # Caches, valid until the set of adapters changes (`_funlora_layers`) or other labels come (`routing_plan`).
    _layers_key: tuple | None = None
    _layers: list = []
    _plan_cache: tuple | None = None

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self._class_table_key = None
        self._class_table: dict[int, tuple[str, int]] = {}
        # Registered after injection; removed again by merge_and_unload / unload.
        self._routing_hook = self.model.register_forward_pre_hook(self._route_class_labels, with_kwargs=True)
        self._restore_hook = self.model.register_forward_hook(self._restore_sample_order)
        self._output_scatter: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------------------------------
    # Injection

    def _prepare_adapter_config(self, peft_config: FunLoRAConfig, model_config: dict) -> FunLoRAConfig:
        """Default `target_modules` to every conv FunLoRA can adapt (dense `nn.Conv2d`s, `groups=1`)."""
        if peft_config.target_modules is None:
            peft_config.target_modules = [name for name, _ in _adaptable_convs(self.model)]
        return peft_config

    def _target_convs(self, peft_config: FunLoRAConfig) -> list[str]:
        """The names of the convs `peft_config` targets, checked before anything is replaced (one pass over the model).

        None (the default) targets every dense conv and skips grouped ones. A name that matches a module FunLoRA
        cannot adapt (a leaf that is no `nn.Conv2d`, or a grouped conv) is refused with the remedy; a container that
        merely holds convs (e.g. a block matched by a broad regex) is not.
        """
        default = peft_config.target_modules is None
        matched, refused, examples = [], [], []
        adapter_parts = tuple(f".{p}" for p in FunLoRALayer.adapter_layer_names)
        for name, module in self.model.named_modules():
            if not name or name.endswith(".base_layer") or any(part in name for part in adapter_parts):
                continue
            is_conv = isinstance(module, (FunLoRALayer, nn.Conv2d))
            if is_conv and len(examples) < 4:
                examples.append(name)
            if default:
                if is_conv and _conv_groups(module) == 1:
                    matched.append(name)
                continue
            result = check_target_module_exists(peft_config, name)
            if not result or _is_excluded(result):
                continue
            if is_conv and _conv_groups(module) == 1:
                matched.append(name)
            elif is_conv:
                refused.append(f"{name} (groups={_conv_groups(module)})")
            elif not list(module.children()):
                refused.append(f"{name} ({type(module).__name__})")
        if refused:
            raise ValueError(
                f"`target_modules`={peft_config.target_modules!r} matches modules FunLoRA cannot adapt: "
                f"{refused[:5]}; it adapts dense nn.Conv2d layers (groups=1) only. Narrow `target_modules` or list "
                "them in `exclude_modules`."
            )
        if not matched:
            raise ValueError(
                f"`target_modules`={peft_config.target_modules!r} (exclude_modules={peft_config.exclude_modules!r}) "
                f"matches no nn.Conv2d of the model. Its convs are named e.g. {examples}; pass names like these, or "
                "leave target_modules=None to adapt every conv."
            )
        return matched

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict=None,
        **kwargs,
    ) -> None:
        """Add the adapter `adapter_name` (its config is in `self.peft_config`) to the targeted convs, all or nothing.

        PEFT's `BaseTuner.inject_adapter` visits every parameter of the model, each earlier adapter's included, at
        every injection (to keep their `requires_grad`), so loading adapters one by one is quadratic in their number.
        A FunLoRA adapter only adds tensors to convs, so this visits the convs once: linear. Everything is checked
        before the first conv is wrapped, and a failure part way removes what was added.
        """
        config = self.peft_config[adapter_name]
        if any(other is config for name, other in self.peft_config.items() if name != adapter_name):
            # One config object for two adapters: PEFT edits configs in place, and the class-ownership check needs
            # them apart.
            config = self.peft_config[adapter_name] = copy.deepcopy(config)
        self._check_new_adapter_config(config, adapter_name)
        targets = self._target_convs(config)
        if config.target_modules is None:
            config.target_modules = list(targets)
        if state_dict is not None:  # low_cpu_mem_usage loading: the modules the weights name
            saved = {key.rsplit("." + self.prefix, 1)[0].removeprefix("_orig_mod.") for key in state_dict}
            targets = [name for name in targets if name in saved]
        first = not self._funlora_layers_uncached(model)
        self._layers_key = None  # the set of layers changes
        wrapped = []
        try:
            for key in targets:
                parent, target, target_name = _get_submodules(model, key)
                if not isinstance(target, FunLoRALayer):
                    wrapped.append((parent, target_name, target))
                with init_empty_weights() if low_cpu_mem_usage else contextlib.nullcontext():
                    self._create_and_replace(config, adapter_name, target, target_name, parent, current_key=key)
        except Exception:
            for parent, target_name, original in wrapped:
                setattr(parent, target_name, original)
            for layer in self._funlora_layers_uncached(model):
                if adapter_name in layer.funlora_a:
                    layer.delete_adapter(adapter_name)
            raise
        for name in targets:
            if name not in self.targeted_module_names:
                self.targeted_module_names.append(name)
        if first:
            self._mark_only_adapters_as_trainable(model)

    def _check_new_adapter_config(self, config: FunLoRAConfig, adapter_name: str | None = None) -> None:
        """Refuse an adapter whose class ids are already owned by another adapter."""
        super()._check_new_adapter_config(config)
        new_ids = set(config.class_ids)
        for name, other in self.peft_config.items():
            if name == adapter_name or (adapter_name is None and other is config):
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
            return
        new_module = Conv2d(target, adapter_name, peft_config, layer_key=current_key)
        new_module._active_adapter = list(self.active_adapters)
        new_module._set_requires_grad(adapter_name, False)
        new_module.set_adapter(self.active_adapters)
        setattr(parent, target_name, new_module)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """Freeze the base model; the adapters keep the flags `set_adapter` gave them (inference-mode ones frozen).

        Only the base model's own tensors are visited, not every adapter's, so adding adapters one by one stays linear
        in their number.
        """
        for module in model.modules():
            if isinstance(module, nn.ParameterDict) or isinstance(module, FunLoRALayer):
                continue  # the adapter tensors (the ParameterDicts) and the layer wrapper itself hold no base tensor
            for param in module._parameters.values():
                if param is not None:
                    param.requires_grad_(False)
        for layer in self._funlora_layers():
            layer.set_adapter(layer.active_adapters)

    # ----------------------------------------------------------------------------------------------------------------
    # Routing

    @staticmethod
    def _funlora_layers_uncached(model: nn.Module) -> list[FunLoRALayer]:
        return [m for m in model.modules() if isinstance(m, FunLoRALayer)]

    def _funlora_layers(self) -> list[FunLoRALayer]:
        """The FunLoRA layers of the model, found once per change of the set of adapters (not at every forward)."""
        key = (len(self.peft_config), tuple(self.peft_config))
        if self._layers_key != key:
            self._layers = self._funlora_layers_uncached(self.model)
            self._layers_key = key
        return self._layers

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
        """Validate `class_labels` and lay the batch out class-interleaved; see `RoutingPlan`.

        Everything is computed on the CPU from the labels: labels given as a list or a CPU tensor cost no device
        synchronisation (a CUDA tensor of labels is copied to the CPU once). The last plan is reused while the same
        labels come again (the steps of a sampling loop).
        """
        labels = _as_label_tensor(class_labels, batch_size)
        table = self.class_table()
        device = self._adapter_device()
        cache_key = (labels.numpy().tobytes(), self._class_table_key, device)
        if self._plan_cache is not None and self._plan_cache[0] == cache_key:
            return self._plan_cache[1]
        unique, counts = torch.unique(labels, return_counts=True)
        unknown = [c for c in unique.tolist() if c not in table]
        if unknown:
            raise ValueError(
                f"class_labels contains {unknown}, which no loaded adapter owns. Known class ids: {sorted(table)}. "
                "Load the adapter of the task that owns them (e.g. `load_adapter`)."
            )
        # Order the classes by adapter (in loading order), then by row, so each adapter's rows are contiguous.
        adapter_order = {name: i for i, name in enumerate(self.peft_config)}
        count_of = dict(zip(unique.tolist(), counts.tolist()))
        present = sorted(count_of, key=lambda c: (adapter_order[table[c][0]], table[c][1]))
        rows_of: dict[str, list[int]] = {}
        for class_id in present:
            name, row = table[class_id]
            rows_of.setdefault(name, []).append(row)
        groups = [
            RoutingGroup(
                name,
                _to_device(torch.tensor(rows), device),
                rows == list(range(len(self.peft_config[name].class_ids))),
            )
            for name, rows in rows_of.items()
        ]
        num_classes, chunk = len(present), max(count_of.values())
        # Slot of every sample: (its rank among the samples of its class) * C + (the position of its class).
        position = torch.tensor([present.index(c) for c in unique.tolist()])[torch.searchsorted(unique, labels)]
        order = torch.argsort(position, stable=True)
        class_counts = torch.tensor([count_of[c] for c in present])
        starts = torch.cumsum(class_counts, 0) - class_counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order)) - starts[position[order]]
        scatter = rank * num_classes + position
        gather = None
        if num_classes * chunk != len(labels) or not torch.equal(scatter, torch.arange(len(labels))):
            slots = torch.zeros(num_classes * chunk, dtype=torch.long)
            slots[scatter] = torch.arange(len(labels))
            # A class with fewer samples than `chunk` repeats its last one in its empty slots.
            slots = slots.view(chunk, num_classes)
            last = slots[class_counts - 1, torch.arange(num_classes)]
            slots = torch.where(torch.arange(chunk)[:, None] < class_counts[None, :], slots, last[None, :])
            gather = _to_device(slots.flatten(), device)
            scatter = _to_device(scatter, device)
        plan = RoutingPlan(labels, present, groups, chunk, gather, None if gather is None else scatter, gather is None)
        self._plan_cache = (cache_key, plan)
        return plan

    def _adapter_device(self) -> torch.device:
        for layer in self._funlora_layers():
            return layer.get_base_layer().weight.device
        return torch.device("cpu")

    @torch.compiler.disable
    def _route_class_labels(self, module, args, kwargs):
        """Forward pre-hook of the wrapped model: take `class_labels` out of the call and route them to the layers.

        Host-side planning (`routing_plan`): `torch.compile` runs it eagerly and compiles the model around it.
        """
        self._output_scatter = None  # a previous forward may have raised before restoring the order
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
        if plan.gather is not None and isinstance(module, UNet2DModel):
            # Every op of a UNet2DModel treats samples independently, so the batch is laid out once here (and put
            # back in the caller's order once in `_restore_sample_order`) rather than at every adapted conv.
            args, kwargs = _reorder_unet_inputs(args, kwargs, plan.gather, plan.batch_size)
            self._output_scatter = plan.scatter
            plan = dataclasses.replace(plan, laid_out=True)
        for layer in layers:
            layer._routing = plan
        return args, kwargs

    def _restore_sample_order(self, module, args, output):
        """Forward hook of the wrapped model: put the outputs back in the caller's order (`_route_class_labels`)."""
        scatter, self._output_scatter = self._output_scatter, None
        if scatter is None:
            return output
        if isinstance(output, tuple):
            return (output[0].index_select(0, scatter),) + output[1:]
        output.sample = output.sample.index_select(0, scatter)
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


_SAVED_PREFIX = "base_model.model."  # what PEFT's save_pretrained puts before the base model's module names


def adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """The tensors of `adapter_name` in `model`, keyed as PEFT saves them (`base_model.model.<conv>.funlora_a`).

    One pass over the model's modules (their number does not grow with the adapters loaded), not over its state dict.
    """
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, FunLoRALayer):
            continue
        for prefix in ("base_model.model.", "model."):
            name = name.removeprefix(prefix)
        for store_name in FunLoRALayer.adapter_layer_names:
            store = getattr(module, store_name)
            if adapter_name in store:
                found[f"{_SAVED_PREFIX}{name}.{store_name}"] = store[adapter_name]
    return found


def check_adapter_state_dict(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> str | None:
    """The first reason `state_dict` cannot be loaded as `adapter_name` into `model`, or None when it fits.

    Keys may be as saved (`base_model.model.<conv>.funlora_a`) or as in the model (with the adapter name appended).
    Checks that every tensor maps to a FunLoRA tensor of an existing conv, that every such tensor is present, that
    shapes match, and that values are floating point and finite.
    """
    expected = adapter_parameters(model, adapter_name)
    seen = set()
    for key, tensor in state_dict.items():
        ckpt_key = _checkpoint_key(key, adapter_name)
        seen.add(ckpt_key)
        layer, _, tensor_name = ckpt_key.removeprefix(_SAVED_PREFIX).rpartition(".")
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
    missing = sorted(set(expected) - seen)
    if missing:
        return f"the checkpoint lacks {len(missing)} tensors the config asks for, e.g. {missing[0]!r}."
    return None


def _checkpoint_key(key: str, adapter_name: str) -> str:
    """A state-dict key as PEFT saves it: the adapter name removed, `base_model.model.` in front."""
    if key.rsplit(".", 1)[-1] == adapter_name:
        key = key.removesuffix(f".{adapter_name}")
    return key if key.startswith(_SAVED_PREFIX) else _SAVED_PREFIX + key


def load_adapter_tensors(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy the checked tensors of `state_dict` (`check_adapter_state_dict`) into adapter `adapter_name` of `model`.

    Raises a ValueError, changing nothing, when they do not fit. Unlike PEFT's `set_peft_model_state_dict`, which
    visits the whole model's state dict, this visits the adapter's own tensors: loading a run of many tasks stays
    linear in their number.
    """
    problem = check_adapter_state_dict(model, adapter_name, state_dict)
    if problem is not None:
        raise ValueError(problem)
    targets = adapter_parameters(model, adapter_name)
    with torch.no_grad():
        for key, tensor in state_dict.items():
            targets[_checkpoint_key(key, adapter_name)].copy_(tensor)


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


def _reorder_unet_inputs(args: tuple, kwargs: dict, gather: torch.Tensor, batch_size: int) -> tuple[tuple, dict]:
    """`UNet2DModel.forward(sample, timestep, ...)` inputs with the per-sample ones taken in the order `gather`."""
    args, kwargs = list(args), dict(kwargs)
    for position, name in enumerate(("sample", "timestep")):
        container, key = (args, position) if len(args) > position else (kwargs, name)
        value = container[key] if (container is args or key in container) else None
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch_size:
            container[key] = value.index_select(0, gather.to(value.device))
    return tuple(args), kwargs


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU index tensor on `device`, copied without making the host wait for the device (pinned memory)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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
