"""Model-level FunLoRA: injection into the convs of a UNet, per-sample class routing, merging and safe loading."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DModel
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.utils import SAFETENSORS_WEIGHTS_NAME, UPCAST_DTYPES, WEIGHTS_NAME, _get_submodules
from safetensors import safe_open
from torch import nn

from .config import FunLoRAConfig
from .layer import Conv2d, FunLoRALayer, RoutingGroup, RoutingPlan, as_class_id, as_class_labels

_ROUTER_ATTRIBUTE = "_funlora_router"
# The dtypes PEFT upcasts its tuners' adapters from (`autocast_adapter_dtype`): fp16, bf16 and this torch's float8s.
_UPCAST_TO_FP32 = frozenset(
    {torch.float16, torch.bfloat16} | {getattr(torch, name) for name in UPCAST_DTYPES if hasattr(torch, name)}
)


def _router_of(model: nn.Module) -> FunLoRAModel | None:
    """The FunLoRA tuner whose hooks route `model`'s class labels, if any."""
    return model.__dict__.get(_ROUTER_ATTRIBUTE)


def _conv_groups(module: nn.Module) -> int:
    conv = module.get_base_layer() if isinstance(module, FunLoRALayer) else module
    return conv.groups


def _walk(model: nn.Module):
    """`(name, module, parent, attribute)` of every module of `model` in `named_modules` order, each once, without
    descending into FunLoRA layers: their children are the wrapped conv and the adapters' tensors, and a model of
    many adapters would otherwise be walked through all of them (`parent` is None for the model itself)."""
    seen, stack = set(), [("", model, None, "")]
    while stack:
        name, module, parent, attribute = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module, parent, attribute
        if isinstance(module, FunLoRALayer):
            continue
        children = [(f"{name}.{key}" if name else key, child, module, key) for key, child in module._modules.items()]
        stack.extend(child for child in reversed(children) if child[1] is not None)


def _adaptable_convs(model: nn.Module, include_grouped: bool = False) -> list[tuple[str, nn.Module]]:
    """`(name, module)` of the convs FunLoRA can adapt, in module order: plain dense `nn.Conv2d`s and already wrapped
    ones; grouped convs (`groups > 1`, e.g. depthwise) only with `include_grouped`."""
    return [
        (name, module)
        for name, module, _, _ in _walk(model)
        if isinstance(module, (FunLoRALayer, nn.Conv2d))
        and not name.endswith(".base_layer")
        and (include_grouped or _conv_groups(module) == 1)
    ]


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
    # The last injected adapter and the layers that got it, for `_cast_adapter_dtype` (PEFT calls it right after).
    _injected: tuple[str | None, list] = (None, [])

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._unloaded = False
        # The tuners whose adapters this one routes besides its own (only the router, the first tuner, has any).
        self._peers: list[FunLoRAModel] = []
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self._class_table_key = None
        self._class_table: dict[int, tuple[str, int]] = {}
        self._output_scatter: torch.Tensor | None = None
        router = _router_of(self.model)
        if router is not None and router is not self:
            # Another FunLoRA tuner already routes this model (PEFT's `inject_adapter_in_model`, called once per
            # adapter, makes one tuner per call): it routes this tuner's adapters too, with one hook pair.
            router._add_peer(self)
            self._routing_hook = self._restore_hook = None
            return
        # Registered after injection; removed again by merge_and_unload / unload.
        self._routing_hook = self.model.register_forward_pre_hook(self._route_class_labels, with_kwargs=True)
        self._restore_hook = self.model.register_forward_hook(self._restore_sample_order)
        self.model.__dict__[_ROUTER_ATTRIBUTE] = self  # not a submodule: a plain reference for `_router_of`

    def _add_peer(self, peer: FunLoRAModel) -> None:
        """Route `peer`'s adapters too (a tuner made by a later `inject_adapter_in_model` on this model)."""
        self._peers.append(peer)

    def _drop_peer(self, peer: FunLoRAModel) -> None:
        """Stop routing `peer`'s adapters (its wrapper was discarded); a tuner that is no peer is ignored."""
        if peer in self._peers:
            self._peers.remove(peer)

    def _remove_hooks(self) -> None:
        for hook in (self._routing_hook, self._restore_hook):
            if hook is not None:
                hook.remove()
        self._routing_hook = self._restore_hook = None
        if self.model.__dict__.get(_ROUTER_ATTRIBUTE) is self:
            del self.model.__dict__[_ROUTER_ATTRIBUTE]

    def _all_configs(self) -> dict[str, FunLoRAConfig]:
        """The configs of every adapter this tuner routes: its own, then those of the tuners sharing its model."""
        configs = dict(self.peft_config)
        for peer in self._peers:
            for name, config in peer.peft_config.items():
                configs.setdefault(name, config)
        return configs

    # ----------------------------------------------------------------------------------------------------------------
    # Injection

    def _prepare_adapter_config(self, peft_config: FunLoRAConfig, model_config: dict) -> FunLoRAConfig:
        """Default `target_modules` to every conv FunLoRA can adapt (dense `nn.Conv2d`s, `groups=1`)."""
        if peft_config.target_modules is None:
            peft_config.target_modules = [name for name, _ in _adaptable_convs(self.model)]
        return peft_config

    def _target_convs(self, peft_config: FunLoRAConfig) -> tuple[dict[str, tuple[nn.Module, nn.Module, str]], bool]:
        """The convs `peft_config` targets, checked before anything is replaced (one pass over the model, not into the
        FunLoRA layers): `{name: (module, parent, attribute)}` in module order, and whether the model holds a FunLoRA
        layer already.

        None (the default) targets every dense conv and skips grouped ones. A name that matches a module FunLoRA
        cannot adapt (a leaf that is no `nn.Conv2d`, or a grouped conv) is refused with the remedy; a container that
        merely holds convs (e.g. a block matched by a broad regex) is not.
        """
        default = peft_config.target_modules is None
        matched, refused, examples, wrapped = {}, [], [], False
        for name, module, parent, attribute in _walk(self.model):
            wrapped = wrapped or isinstance(module, FunLoRALayer)
            if not name or name.endswith(".base_layer"):
                continue
            is_conv = isinstance(module, (FunLoRALayer, nn.Conv2d))
            if is_conv and len(examples) < 4:
                examples.append(name)
            if default:
                if is_conv and _conv_groups(module) == 1:
                    matched[name] = (module, parent, attribute)
                continue
            if not is_conv and next(module.children(), None) is not None:
                continue  # a container: matched or not, it is neither adapted nor refused
            result = check_target_module_exists(peft_config, name)
            if not result or _is_excluded(result):
                continue
            if is_conv and _conv_groups(module) == 1:
                matched[name] = (module, parent, attribute)
            elif is_conv:
                refused.append(f"{name} (groups={_conv_groups(module)})")
            else:
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
        return matched, wrapped

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
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(
                f"adapter_name={adapter_name!r} cannot name a FunLoRA adapter: it keys the adapter's tensors in every "
                "conv, so it must be a non-empty name without '.', e.g. 'task_0'."
            )
        config = self.peft_config[adapter_name]
        if any(other is config for name, other in self.peft_config.items() if name != adapter_name):
            # One config object for two adapters: PEFT edits configs in place, and the class-ownership check needs
            # them apart.
            config = self.peft_config[adapter_name] = copy.deepcopy(config)
        self._check_new_adapter_config(config, adapter_name)
        targets, wrapped_before = self._target_convs(config)
        if config.target_modules is None:
            config.target_modules = list(targets)
        if state_dict is not None:  # low_cpu_mem_usage loading: the modules the weights name
            saved = {key.rsplit("." + self.prefix, 1)[0].removeprefix("_orig_mod.") for key in state_dict}
            targets = {name: found for name, found in targets.items() if name in saved}
        self._layers_key = None  # the set of layers changes
        wrapped = []
        try:
            for key, (target, parent, target_name) in targets.items():
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
        self._injected = (adapter_name, [getattr(parent, attribute) for _, parent, attribute in targets.values()])
        if not wrapped_before:
            self._mark_only_adapters_as_trainable(model)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Upcast `adapter_name`'s fp16 / bf16 / float8 tensors to fp32, as PEFT does for its tuners
        (`autocast_adapter_dtype`).

        PEFT's own version walks every submodule of every adapted layer, each earlier adapter's tensors included, at
        every `add_adapter`; this visits the FunLoRA layers' stores of this one adapter.
        """
        injected_name, injected_layers = self._injected
        self._injected = (None, [])  # used once: keep no reference to layers that may be unloaded later
        if not autocast_adapter_dtype:
            return
        layers = injected_layers if injected_name == adapter_name else self._funlora_layers()
        for layer in layers:
            for store_name in FunLoRALayer.adapter_layer_names:
                store = getattr(layer, store_name)
                tensor = store.get(adapter_name)
                if tensor is not None and tensor.dtype in _UPCAST_TO_FP32:
                    store[adapter_name] = nn.Parameter(tensor.detach().float(), requires_grad=tensor.requires_grad)

    def _check_new_adapter_config(self, config: FunLoRAConfig, adapter_name: str | None = None) -> None:
        """Refuse an adapter whose class ids are already owned by another adapter."""
        super()._check_new_adapter_config(config)
        new_ids = set(config.class_ids)
        router = _router_of(self.model)
        configs = router._all_configs() if router is not None and router is not self else {}
        configs.update(self.peft_config)
        for name, other in configs.items():
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
        return [module for _, module, _, _ in _walk(model) if isinstance(module, FunLoRALayer)]

    def _funlora_layers(self) -> list[FunLoRALayer]:
        """The FunLoRA layers of the model, found once per change of the set of adapters (not at every forward)."""
        key = tuple(self._all_configs())
        if self._layers_key != key:
            self._layers = self._funlora_layers_uncached(self.model)
            self._layers_key = key
        return self._layers

    def class_table(self) -> dict[int, tuple[str, int]]:
        """`{class_id: (adapter_name, row)}` over all loaded adapters."""
        configs = self._all_configs()
        key = tuple((name, tuple(cfg.class_ids)) for name, cfg in configs.items())
        if key != self._class_table_key:
            table = {}
            for name, cfg in configs.items():
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
        labels = as_class_labels(class_labels, batch_size)
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
        configs = self._all_configs()
        adapter_order = {name: i for i, name in enumerate(configs)}
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
        if not layers or all(layer.disable_adapters for layer in layers) or not self.class_table():
            if class_labels is not None and layers and not self.class_table():
                raise ValueError(
                    "`class_labels` were given, but no adapter is loaded (every one was deleted): add or load an "
                    "adapter, or call the model without class labels for the base model's output."
                )
            for layer in layers:
                layer._routing = None
            return args, kwargs
        if class_labels is None:
            raise ValueError(
                "`class_labels` is missing: FunLoRA conditions on the class, so pass one label per sample, e.g. "
                "model(x_t, timestep, class_labels=labels). For the base model's output use "
                "`with model.disable_adapter(): ...`."
            )
        plan = self.routing_plan(class_labels, batch_size=_batch_size(args, kwargs))
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

    def _merged_weights(self, owner: str, class_label: int, safe_merge: bool) -> list[torch.Tensor | None]:
        """W_y of `class_label` for every FunLoRA conv, computed before anything is written; with `safe_merge`, a
        non-finite one raises and the model is left as it was."""
        named = self._named_funlora_layers()
        weights = [layer.merged_weight(owner, class_label) for _, layer in named]
        if safe_merge:
            for (name, _), weight in zip(named, weights):
                if weight is not None and not torch.isfinite(weight).all():
                    raise ValueError(
                        f"Merging class {class_label} of adapter {owner!r} gives non-finite weights in {name!r}; "
                        "nothing was merged: the model is left as it was."
                    )
        return weights

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make `adapter_name` (one name or a list) the active adapter(s): only their tensors require grad.

        An unknown name is refused before anything changes (PEFT's tuner would activate it and freeze every adapter).
        """
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        known = self._all_configs()
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise TypeError(f"`adapter_name` must be an adapter name or a list of them, got {adapter_name!r}.")
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"set_adapter: {unknown} are not adapters of this model; it has {list(known)}.")
        super().set_adapter(adapter_name, inference_mode=inference_mode)

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False, class_label: int | None = None) -> None:
        """Write W_y of `class_label` into every adapted conv (a batch of that class then runs at plain-UNet cost).

        All or nothing: every conv's merged weight is computed (and, with `safe_merge`, checked to be finite) before
        the first one is written. A class already merged is a no-op; another merged class must be unmerged first.
        """
        owner = self._owner_of(class_label)
        class_label = as_class_id(class_label)
        named = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        if named is not None and owner not in named:
            raise ValueError(
                f"class_label={class_label} belongs to adapter {owner!r}, which adapter_names={adapter_names!r} "
                "leaves out; FunLoRA merges the adapter owning the class: pass adapter_names=None."
            )
        layers = self._funlora_layers()
        merged_classes = {layer._merged_class for layer in layers if layer.merged}
        if merged_classes == {class_label}:
            return
        if merged_classes:
            raise ValueError(
                f"Class {merged_classes.pop()} is already merged into the convs; call unmerge_adapter() before "
                f"merging class {class_label}."
            )
        weights = self._merged_weights(owner, class_label, safe_merge)
        for layer, weight in zip(layers, weights):
            layer._write_merged(owner, class_label, weight)

    def unmerge_adapter(self) -> None:
        """Restore every conv's W0 bit-exactly."""
        for layer in self._funlora_layers():
            layer.unmerge()

    def release_class_weights(self) -> None:
        """Free the class weights W_y that forwards without gradients keep for the next step of a sampling loop.

        They hold one copy of every adapted conv's weight per class of the batch (for 100 classes of the 35.7 M
        parameter CIFAR UNet, 14 GB in fp32). The pipeline releases them when its call ends; the next forward without
        gradients builds them again. A training forward releases its layer's own.
        """
        for layer in self._funlora_layers():
            layer.release_class_weights()

    def _named_funlora_layers(self) -> list[tuple[str, FunLoRALayer]]:
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, FunLoRALayer)]

    def _owner_of(self, class_label) -> str:
        """The adapter owning `class_label` (checked: an integer class id of a loaded adapter)."""
        if self._unloaded:
            raise ValueError(
                "This FunLoRA model was already unloaded (merge_and_unload / unload returned its base model): it has "
                "no adapters left to merge. Load the adapters again, e.g. FunLoRAPipeline.from_pretrained(run)."
            )
        if class_label is None:
            raise ValueError(
                "FunLoRA merges one class at a time: pass `class_label`, e.g. merge_and_unload(class_label=3)."
            )
        class_label = as_class_id(class_label)
        table = self.class_table()
        if class_label not in table:
            raise ValueError(
                f"class_label={class_label} is owned by no loaded adapter. Known class ids: {sorted(table)}."
            )
        return table[class_label][0]

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None, class_label: int | None = None
    ) -> nn.Module:
        """Return the plain base model with W_y of `class_label` written into its convs (FunLoRA layers removed).

        All or nothing: with `safe_merge`, a non-finite merged weight in any conv leaves the model as it was.
        """
        owner = self._owner_of(class_label)
        class_label = as_class_id(class_label)
        weights = self._merged_weights(owner, class_label, safe_merge)
        self.unmerge_adapter()
        return self._unload_and_optionally_merge(merge=True, weights=weights)

    def unload(self) -> nn.Module:
        """Return the base model with the FunLoRA layers removed and W0 untouched."""
        return self._unload_and_optionally_merge(merge=False)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None, **kw):
        if self._unloaded:
            raise ValueError(
                "This FunLoRA model was already unloaded: merge_and_unload / unload returned its base model once."
            )
        layers = self._named_funlora_layers()
        weights = kw.get("weights") or [None] * len(layers)
        for (key, layer), weight in zip(layers, weights):
            parent, _, target_name = _get_submodules(self.model, key)
            base = layer.get_base_layer()
            if merge and weight is not None:
                base.weight.data = weight  # W_y is now the base model's own weight
            setattr(parent, target_name, base)
        self._remove_hooks()
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        self._unloaded = True
        self._layers_key = None
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
# What PEFT puts before the base model's module names: in a PeftModel, and in the tuner model (`PeftModel.base_model`).
_PEFT_PREFIXES = (_SAVED_PREFIX, "model.")


def base_model_name(name: str) -> str:
    """The module's name inside the base model (what `target_modules` matches), without PEFT's prefixes."""
    for prefix in _PEFT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """The tensors of `adapter_name` in `model`, keyed as PEFT saves them (`base_model.model.<conv>.funlora_a`).

    One pass over the model's modules, not into the FunLoRA layers (whose tensors grow with the adapters loaded), nor
    over its state dict.
    """
    found = {}
    for name, module, _, _ in _walk(model):
        if not isinstance(module, FunLoRALayer):
            continue
        name = base_model_name(name)
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
    return _state_dict_problem(adapter_parameters(model, adapter_name), adapter_name, state_dict)


def _state_dict_problem(
    expected: dict[str, nn.Parameter], adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> str | None:
    """`check_adapter_state_dict` against the adapter's tensors `expected` (`adapter_parameters`)."""
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
    targets = adapter_parameters(model, adapter_name)
    problem = _state_dict_problem(targets, adapter_name, state_dict)
    if problem is not None:
        raise ValueError(problem)
    with torch.no_grad():
        for key, tensor in state_dict.items():
            targets[_checkpoint_key(key, adapter_name)].copy_(tensor)


@contextlib.contextmanager
def requires_grad_restored_on_failure(model: nn.Module):
    """On an exception, give every parameter of `model` back the `requires_grad` it had on entry.

    Wrapping a model in a PeftModel freezes its own parameters; a load that then fails and unwraps it must not leave
    a model that trained before frozen.
    """
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        yield
    except BaseException:
        for param, flag in flags:
            param.requires_grad_(flag)
        raise


def _discard_adapter(peft_model: nn.Module, adapter_name: str) -> None:
    """Remove `adapter_name` after a failed load; unwrap the model entirely when it was the only adapter."""
    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(tuner, FunLoRAModel) or tuner._unloaded or adapter_name not in tuner.peft_config:
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


def _batch_size(args: tuple, kwargs: dict) -> int:
    """The batch size of a model call: the first dimension of its first tensor argument (`sample` for a UNet)."""
    candidates = list(args) + [kwargs[key] for key in ("sample", *kwargs) if key in kwargs]
    for value in candidates:
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return value.shape[0]
    raise ValueError(
        "FunLoRA found no batched tensor among the model's inputs to match `class_labels` against; pass the "
        "model's input tensor (e.g. the UNet's `sample`)."
    )


def check_adapter_files(model_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs) -> None:
    """Refuse an adapter whose weights are not a readable `adapter_model.safetensors`, before anything is loaded.

    FunLoRA adapters are safetensors only: PEFT falls back to `adapter_model.bin` through `torch.load` (unpickling)
    when no safetensors file is present, which this refuses. A local folder is checked in place (the file exists and
    its header reads); for a Hub repo the safetensors file is fetched first (it lands in the cache PEFT then reads).
    """
    folder = Path(model_id) / (subfolder or "")
    if Path(model_id).is_dir():
        weights = folder / SAFETENSORS_WEIGHTS_NAME
        if not weights.is_file():
            pickled = [name for name in (WEIGHTS_NAME, "adapter_model.pt") if (folder / name).is_file()]
            if pickled:
                raise ValueError(
                    f"{folder / pickled[0]}: FunLoRA loads adapters from safetensors only, never from pickle files. "
                    "Save the adapter again with save_pretrained (it writes adapter_model.safetensors)."
                )
            raise ValueError(f"{weights} is missing: a FunLoRA adapter folder holds {SAFETENSORS_WEIGHTS_NAME}.")
    else:
        from huggingface_hub import hf_hub_download

        allowed = {
            key: hub_kwargs[key] for key in ("revision", "token", "cache_dir", "local_files_only") if key in hub_kwargs
        }
        try:
            weights = Path(hf_hub_download(str(model_id), SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **allowed))
        except Exception as error:  # noqa: BLE001 - the Hub raises many types; the message says what to check
            raise ValueError(
                f"Could not get {SAFETENSORS_WEIGHTS_NAME} of {model_id!r} ({type(error).__name__}: {error}); FunLoRA "
                "loads adapters from safetensors only."
            ) from error
    try:
        with safe_open(weights, framework="pt"):
            pass
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
        raise ValueError(
            f"{weights} cannot be read as safetensors ({error}); the file is truncated or corrupted."
        ) from None


def _guard_load_adapter(load_adapter):
    """`PeftModel.load_adapter`, made all or nothing for FunLoRA models (other tuners go straight through).

    PEFT's load path falls back to pickle files, leaves a half-loaded adapter (and, from `PeftModel.from_pretrained`,
    a wrapped model) behind when the weights cannot be read, and loads into an adapter name in use, which for FunLoRA
    would silently give one task's classes another task's tensors. For a FunLoRA model this refuses a name already
    loaded and weights that are not a readable safetensors file before anything is loaded, and on any failure removes
    the adapter it was loading (unwrapping the model when it was the only one).
    """

    @functools.wraps(load_adapter)
    def guarded(self, model_id, adapter_name, *args, **kwargs):
        tuner = getattr(self, "base_model", None)
        if not isinstance(tuner, FunLoRAModel):
            return load_adapter(self, model_id, adapter_name, *args, **kwargs)
        fresh = _FROM_PRETRAINED.get()  # from_pretrained injected this adapter a moment ago: its weights are due now
        token = _FROM_PRETRAINED.set(False)
        try:
            return _load_all_or_nothing(load_adapter, self, model_id, adapter_name, fresh, *args, **kwargs)
        finally:
            _FROM_PRETRAINED.reset(token)

    guarded._funlora_guard = True
    return guarded


def _load_all_or_nothing(load_adapter, peft_model, model_id, adapter_name, fresh, *args, **kwargs):
    """Refuse a name in use (unless `fresh`) and unreadable weights, load, and on failure remove the adapter."""
    if adapter_name in peft_model.peft_config and not fresh:
        classes = peft_model.peft_config[adapter_name].class_ids
        raise ValueError(
            f"adapter_name={adapter_name!r} is already loaded (classes {classes}): loading other weights under its "
            f"name would give its classes another task's tensors. Load under a new name, or "
            f"delete_adapter({adapter_name!r}) first."
        )
    try:
        check_adapter_files(model_id, **kwargs)
        return load_adapter(peft_model, model_id, adapter_name, *args, **kwargs)
    except Exception:
        _discard_adapter(peft_model, adapter_name)
        tuner = peft_model.base_model
        router = _router_of(tuner.model)
        if fresh and router is not None:
            router._drop_peer(tuner)  # the wrapper from_pretrained made is dropped: its tuner routes nothing
        raise


_FROM_PRETRAINED = contextvars.ContextVar("funlora_from_pretrained", default=False)


def _guard_from_pretrained(from_pretrained):
    """`PeftModel.from_pretrained`, marked so that its own `load_adapter` call may fill the adapter it just created.

    `from_pretrained` wraps the model (injecting the adapter with its initial values) and then loads the weights under
    the same name; any other `load_adapter` into a name in use is refused (see `_guard_load_adapter`).
    """
    function = from_pretrained.__func__

    @functools.wraps(function)
    def guarded(cls, *args, **kwargs):
        model = args[0] if args else kwargs.get("model")
        token = _FROM_PRETRAINED.set(True)
        try:
            if not isinstance(model, nn.Module):
                return function(cls, *args, **kwargs)
            with requires_grad_restored_on_failure(model):
                return function(cls, *args, **kwargs)
        finally:
            _FROM_PRETRAINED.reset(token)

    guarded._funlora_guard = True
    return classmethod(guarded)
