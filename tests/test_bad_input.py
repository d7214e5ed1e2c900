"""Bad input and tampering, as a new user would meet them: every row is refused with the right error type and a message
naming the argument or the file, and leaves the model (`torch.equal` state dict, same modules, no hooks on a plain
UNet) or the folder (sha256 of every file) exactly as it was.

One row per case, grouped by entry point: the config, injection, the forward call, merging, PEFT's loaders, the
pipeline, the run folder, the `funlora` command and the training script.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_TRAIN_ARGS, load_example, load_pipeline, make_inputs, make_unet
from diffusers import DDPMScheduler
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from funlora_peft import FunLoRAConfig, FunLoRALayer, FunLoRAPipeline, cli
from funlora_peft.run_folder import INDEX_FILE, attach_tasks, read_index, save_run, write_index


@dataclass
class Case:
    """A bad call `act(env)`, the error it must raise, and what it must leave unchanged ("model", "folder", "unet")."""

    id: str
    act: Callable
    error: type
    match: str
    keeps: str = "model"


def model_snapshot(model: torch.nn.Module) -> tuple:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modules = [(name, type(m).__name__) for name, m in model.named_modules()]
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    trainable = [(name, param.requires_grad) for name, param in model.named_parameters()]
    return state, modules, hooks, trainable


def same_model(before: tuple, after: tuple) -> bool:
    (state_a, modules_a, hooks_a, trainable_a), (state_b, modules_b, hooks_b, trainable_b) = before, after
    return (
        state_a.keys() == state_b.keys()
        and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
        and modules_a == modules_b
        and hooks_a == hooks_b
        and trainable_a == trainable_b
    )


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def two_tasks() -> PeftModel:
    model = get_peft_model(make_unet("attn"), FunLoRAConfig(class_ids=[0, 1], init_alpha=0.2, init_seed=0), "task_0")
    model.add_adapter("task_1", FunLoRAConfig(class_ids=[2, 3], init_alpha=0.2, init_seed=1))
    return model


def forward(env, labels):
    x_t, t = make_inputs(env.model.base_model.model, batch_size=2)
    with torch.no_grad():
        env.model(x_t, t, class_labels=labels)


def rehash(folder: Path) -> None:
    """Write the index again over the folder's current files: only the content checks can then catch a change."""
    index = read_index(folder)
    write_index(folder, index.tasks, index.class_names)


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def with_grouped_conv():
    unet = make_unet("attn")
    unet.conv_in = torch.nn.Conv2d(1, 16, 3, padding=1, groups=1)
    unet.add_module("depthwise", torch.nn.Conv2d(16, 16, 3, padding=1, groups=16))
    return unet


def poison(env) -> None:
    """Make one conv's task_1 merge non-finite (its last layer), leaving the others finite."""
    layer = [m for m in env.model.modules() if isinstance(m, FunLoRALayer)][-1]
    with torch.no_grad():
        layer.funlora_alpha["task_1"].fill_(1e38)
        layer.funlora_a["task_1"].fill_(1e38)


# ---------------------------------------------------------------------------------------------------------------------
# FunLoRAConfig

CONFIG_CASES = [
    Case("config-class-ids-missing", lambda env: FunLoRAConfig(), ValueError, r"`class_ids` is required"),
    Case("config-class-ids-empty", lambda env: FunLoRAConfig(class_ids=[]), ValueError, r"`class_ids` is empty"),
    Case("config-class-ids-repeated", lambda env: FunLoRAConfig(class_ids=[1, 1]), ValueError, r"must be distinct"),
    Case("config-class-ids-float", lambda env: FunLoRAConfig(class_ids=[1.5]), ValueError, r"non-negative ints"),
    Case("config-class-ids-bool", lambda env: FunLoRAConfig(class_ids=[True]), ValueError, r"non-negative ints"),
    Case("config-class-ids-negative", lambda env: FunLoRAConfig(class_ids=[-1]), ValueError, r"non-negative ints"),
    Case("config-class-ids-int", lambda env: FunLoRAConfig(class_ids=3), TypeError, r"`class_ids` must be a list"),
    Case("config-function", lambda env: FunLoRAConfig(class_ids=[0], function="sine"), ValueError, r"'sine'.*cos"),
    Case(
        "config-function-list",
        lambda env: FunLoRAConfig(class_ids=[0], function=["cos"]),
        TypeError,
        r"`function` must be a name.*\['cos'\]",
    ),  # fmt: skip
    Case(
        "config-class-id-beyond-int64",
        lambda env: FunLoRAConfig(class_ids=[2**63]),
        ValueError,
        r"int64 labels, at most 9223372036854775807\), got \[9223372036854775808\]",
    ),  # fmt: skip
    Case(
        "config-init-seed-huge",
        lambda env: FunLoRAConfig(class_ids=[0], init_seed=2**62),
        ValueError,
        r"`init_seed` must be between 0 and \d+ .* got 4611686018427387904",
    ),  # fmt: skip
    Case(
        "config-target-modules-int",
        lambda env: FunLoRAConfig(class_ids=[0], target_modules=5),
        TypeError,
        r"`target_modules` must be None, a regex string or a list of module names, got 5",
    ),  # fmt: skip
    Case(
        "config-exclude-modules-int",
        lambda env: FunLoRAConfig(class_ids=[0], exclude_modules=5),
        TypeError,
        r"`exclude_modules` must be None, a regex string or a list of module names, got 5",
    ),  # fmt: skip
    Case("config-p-zero", lambda env: FunLoRAConfig(class_ids=[0], num_functions=0), ValueError, r"num_functions"),
    Case("config-p-float", lambda env: FunLoRAConfig(class_ids=[0], num_functions=2.5), TypeError, r"num_functions"),
    Case(
        "config-linear-p",
        lambda env: FunLoRAConfig(class_ids=[0], function="linear", num_functions=10),
        ValueError,
        r"'linear' is a single rank-1 term",
    ),
    Case(
        "config-a-std-inf",
        lambda env: FunLoRAConfig(class_ids=[0], init_a_std=float("inf")),
        ValueError,
        r"`init_a_std` must be a finite number",
    ),  # fmt: skip
    Case(
        "config-alpha-nan",
        lambda env: FunLoRAConfig(class_ids=[0], init_alpha=float("nan")),
        ValueError,
        r"`init_alpha` must be a finite number",
    ),  # fmt: skip
    Case("config-b-std-zero", lambda env: FunLoRAConfig(class_ids=[0], init_b_std=0.0), ValueError, r"init_b_std"),
    Case("config-omega-str", lambda env: FunLoRAConfig(class_ids=[0], init_omega="1"), ValueError, r"init_omega"),
    Case("config-seed-float", lambda env: FunLoRAConfig(class_ids=[0], init_seed=1.5), TypeError, r"init_seed"),
]

# ---------------------------------------------------------------------------------------------------------------------
# Injection: nothing is wrapped unless everything checks out

INJECTION_CASES = [
    Case(
        "add-adapter-dotted-name",
        lambda env: env.model.add_adapter("task.2", FunLoRAConfig(class_ids=[9])),
        ValueError,
        r"adapter_name='task.2' cannot name a FunLoRA adapter.*without '\.'",
    ),  # fmt: skip
    Case(
        "inject-dotted-name",
        lambda env: get_peft_model(env.unet, FunLoRAConfig(class_ids=[9]), "task.2"),
        ValueError,
        r"adapter_name='task.2' cannot name a FunLoRA adapter",
        "unet",
    ),  # fmt: skip
    Case(
        "inject-unknown-target",
        lambda env: get_peft_model(env.unet, FunLoRAConfig(class_ids=[0], target_modules=["nope"])),
        ValueError,
        r"matches no nn.Conv2d",
        "unet",
    ),
    Case(
        "inject-linear-target",
        lambda env: get_peft_model(env.unet, FunLoRAConfig(class_ids=[0], target_modules=["conv_in", "linear_1"])),
        ValueError,
        r"cannot adapt: \['time_embedding.linear_1 \(Linear\)'\]",
        "unet",
    ),
    Case(
        "inject-grouped-target",
        lambda env: get_peft_model(env.grouped, FunLoRAConfig(class_ids=[0], target_modules=["conv_in", "depthwise"])),
        ValueError,
        r"cannot adapt: \['depthwise \(groups=16\)'\].*groups=1",
        "grouped",
    ),
    Case(
        "add-adapter-class-clash",
        lambda env: env.model.add_adapter("task_2", FunLoRAConfig(class_ids=[3, 4])),
        ValueError,
        r"Class ids \[3\] are already owned by adapter 'task_1'",
    ),
    Case(
        "add-adapter-same-config-object",
        lambda env: env.model.add_adapter("task_2", env.model.peft_config["task_1"]),
        ValueError,
        r"Class ids \[2, 3\] are already owned by adapter 'task_1'",
    ),
    Case(
        "add-adapter-bad-target",
        lambda env: env.model.add_adapter("task_2", FunLoRAConfig(class_ids=[4], target_modules=["nope"])),
        ValueError,
        r"matches no nn.Conv2d",
    ),
]

# ---------------------------------------------------------------------------------------------------------------------
# The forward call's class labels

LABEL_CASES = [
    Case("labels-missing", lambda env: forward(env, None), ValueError, r"`class_labels` is missing"),
    Case("labels-unknown", lambda env: forward(env, [0, 9]), ValueError, r"contains \[9\], which no loaded adapter"),
    Case("labels-float-tensor", lambda env: forward(env, torch.tensor([3.9, 1.0])), TypeError, r"dtype torch.float32"),
    Case("labels-bool-tensor", lambda env: forward(env, torch.tensor([True, False])), TypeError, r"torch.bool"),
    Case("labels-float-list", lambda env: forward(env, [2.7, 1]), TypeError, r"integer class ids, got 2.7"),
    Case("labels-bool-list", lambda env: forward(env, [True, 1]), TypeError, r"integer class ids, got True"),
    Case("labels-length", lambda env: forward(env, [0, 1, 2]), ValueError, r"must have shape \(2,\)"),
    Case("labels-2d", lambda env: forward(env, torch.zeros(2, 1, dtype=torch.long)), ValueError, r"shape \(2,\)"),
    Case("labels-string", lambda env: forward(env, "3"), TypeError, r"`class_labels` must be a tensor"),
]

# ---------------------------------------------------------------------------------------------------------------------
# Merging: one integer class, all or nothing


def merge_twice(env) -> None:
    env.model.merge_and_unload(class_label=0)
    env.after_first = model_snapshot(env.unet_of_model)
    env.model.merge_and_unload(class_label=2)


def merge_other_class(env) -> None:
    env.model.base_model.merge_adapter(class_label=0)
    env.model.base_model.merge_adapter(class_label=2)


def poisoned_merge(method: str) -> Callable:
    def act(env) -> None:
        poison(env)
        env.before = model_snapshot(env.model)  # after poisoning, before the merge
        getattr(env.model.base_model, method)(class_label=2, safe_merge=True)

    return act


MERGE_CASES = [
    Case(
        "set-unknown-adapter",
        lambda env: env.model.base_model.set_adapter(["task_0", "nope"]),
        ValueError,
        r"set_adapter: \['nope'\] are not adapters of this model; it has \['task_0', 'task_1'\]",
    ),  # fmt: skip
    Case("merge-float-class", lambda env: env.model.merge_and_unload(class_label=2.5), TypeError, r"`class_label`"),
    Case("merge-bool-class", lambda env: env.model.merge_and_unload(class_label=True), TypeError, r"`class_label`"),
    Case(
        "merge-float-tensor",
        lambda env: env.model.base_model.merge_adapter(class_label=torch.tensor(2.0)),
        TypeError,
        r"`class_label` must be one integer class id",
    ),  # fmt: skip
    Case("merge-unknown-class", lambda env: env.model.merge_and_unload(class_label=9), ValueError, r"class_label=9"),
    Case("merge-no-class", lambda env: env.model.merge_and_unload(), ValueError, r"one class at a time"),
    Case(
        "merge-other-adapter",
        lambda env: env.model.base_model.merge_adapter(adapter_names=["task_1"], class_label=0),
        ValueError,
        r"class_label=0 belongs to adapter 'task_0', which adapter_names=\['task_1'\] leaves out",
    ),  # fmt: skip
    Case(
        "merge-and-unload-safe-nonfinite",
        poisoned_merge("merge_and_unload"),
        ValueError,
        r"non-finite weights in .*left as it was",
    ),  # fmt: skip
    Case(
        "merge-adapter-safe-nonfinite",
        poisoned_merge("merge_adapter"),
        ValueError,
        r"non-finite weights in .*nothing was merged",
    ),  # fmt: skip
    Case("merge-and-unload-twice", merge_twice, ValueError, r"already unloaded", "first-merge"),
    Case("merge-another-class", merge_other_class, ValueError, r"Class 0 is already merged", "merged-0"),
]

# ---------------------------------------------------------------------------------------------------------------------
# PEFT's loaders on FunLoRA adapters: all or nothing, safetensors only


def saved_adapter(env, name="task_1") -> Path:
    folder = env.tmp / "saved"
    env.model.save_pretrained(folder, save_embedding_layers=False)
    return folder / name


def from_pretrained_with(change: Callable[[Path], None]) -> Callable:
    def act(env) -> None:
        folder = saved_adapter(env)
        change(folder)
        env.before = model_snapshot(env.unet)
        PeftModel.from_pretrained(env.unet, folder, adapter_name="task_1")

    return act


def config_with_bad_json(env) -> None:
    folder = saved_adapter(env)
    (folder / "adapter_config.json").write_text("{oops")
    FunLoRAConfig.from_pretrained(folder)


def load_with_config(change: Callable[[dict], object]) -> Callable:
    """PeftModel.from_pretrained of a saved task whose adapter_config.json holds `change(its fields)`."""

    def act(env) -> None:
        folder = saved_adapter(env)
        path = folder / "adapter_config.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
        PeftModel.from_pretrained(env.unet, folder, adapter_name="task_1")

    return act


def config_as_a_list(env) -> None:
    folder = saved_adapter(env)
    (folder / "adapter_config.json").write_text(json.dumps([json.loads((folder / "adapter_config.json").read_text())]))
    FunLoRAConfig.from_pretrained(folder)


def to_bin(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.rename(folder / "adapter_model.bin")


LOAD_CASES = [
    Case(
        "from-pretrained-no-weights",
        from_pretrained_with(lambda f: (f / "adapter_model.safetensors").unlink()),
        ValueError,
        r"adapter_model.safetensors is missing",
        "unet",
    ),  # fmt: skip
    Case(
        "from-pretrained-truncated",
        from_pretrained_with(
            lambda f: (f / "adapter_model.safetensors").write_bytes(
                (f / "adapter_model.safetensors").read_bytes()[:-9]
            )
        ),
        ValueError,
        r"adapter_model.safetensors cannot be read as safetensors",
        "unet",
    ),  # fmt: skip
    Case(
        "from-pretrained-pickle",
        from_pretrained_with(to_bin),
        ValueError,
        r"adapter_model.bin: FunLoRA loads adapters from safetensors only",
        "unet",
    ),  # fmt: skip
    # PEFT reads the config before it knows the tuner (its own JSONDecodeError); ours names the file.
    Case(
        "config-from-pretrained-bad-json", config_with_bad_json, ValueError, r"adapter_config.json is not valid JSON"
    ),  # fmt: skip
    Case(
        "from-pretrained-config-p-zero",
        load_with_config(lambda d: {**d, "num_functions": 0}),
        ValueError,
        r"task_1/adapter_config.json: `num_functions` must be >= 1, got 0",
        "unet",
    ),  # fmt: skip
    Case("config-from-pretrained-list", config_as_a_list, ValueError, r"adapter_config.json holds list, not a JSON"),
    Case(
        "load-adapter-name-in-use",
        lambda env: env.model.load_adapter(saved_adapter(env, "task_0"), "task_1"),
        ValueError,
        r"adapter_name='task_1' is already loaded \(classes \[2, 3\]\)",
    ),  # fmt: skip
    Case(
        "load-adapter-other-unet",
        lambda env: env.small.load_adapter(saved_adapter(env), "task_1"),
        ValueError,
        r"Cannot load adapter 'task_1'.*differently shaped UNet",
        "small",
    ),  # fmt: skip
]

# ---------------------------------------------------------------------------------------------------------------------
# FunLoRAPipeline


def pipe_call(**kwargs) -> Callable:
    def act(env) -> None:
        env.pipe(**{"num_inference_steps": 2, "class_labels": [0], **kwargs})

    return act


PIPELINE_CASES = [
    Case("pipe-labels-none", pipe_call(class_labels=None), ValueError, r"`class_labels` is required", "pipe"),
    Case("pipe-labels-float", pipe_call(class_labels=[2.7]), TypeError, r"integer class ids, got 2.7", "pipe"),
    Case(
        "pipe-labels-float-tensor",
        pipe_call(class_labels=torch.tensor([3.9])),
        TypeError,
        r"dtype torch.float32",
        "pipe",
    ),  # fmt: skip
    Case("pipe-labels-bool", pipe_call(class_labels=[True]), TypeError, r"got True", "pipe"),
    Case("pipe-labels-unknown", pipe_call(class_labels=[9]), ValueError, r"class_labels \[9\] are not loaded", "pipe"),
    Case("pipe-label-name", pipe_call(class_labels=["nine"]), ValueError, r"Unknown label 'nine'", "pipe"),
    Case(
        "pipe-steps-float",
        pipe_call(num_inference_steps=2.5),
        TypeError,
        r"`num_inference_steps` must be an int",
        "pipe",
    ),  # fmt: skip
    Case("pipe-steps-str", pipe_call(num_inference_steps="5"), TypeError, r"`num_inference_steps`", "pipe"),
    Case(
        "pipe-steps-zero", pipe_call(num_inference_steps=0), ValueError, r"`num_inference_steps` must be >= 1", "pipe"
    ),
    Case(
        "pipe-generators-short",
        pipe_call(class_labels=[0, 1], generator=[torch.Generator()]),
        ValueError,
        r"list of generators of length 1, but requested an effective batch size of 2",
        "pipe",
    ),  # fmt: skip
    Case(
        "pipe-generators-long",
        pipe_call(generator=[torch.Generator(), torch.Generator()]),
        ValueError,
        r"list of generators of length 2",
        "pipe",
    ),  # fmt: skip
    Case("pipe-output-type", pipe_call(output_type="jpg"), ValueError, r"`output_type` must be", "pipe"),
    Case(
        "pipe-tasks-int",
        lambda env: FunLoRAPipeline.from_pretrained(env.folder, tasks=5),
        TypeError,
        r"`tasks` must be None, a task name or a list of them, got 5",
        "folder",
    ),  # fmt: skip
    Case(
        "pipe-dtype-string",
        lambda env: FunLoRAPipeline.from_pretrained(env.folder, dtype="float16"),
        TypeError,
        r"`dtype` must be a torch.dtype such as torch.float16, got 'float16'",
        "folder",
    ),  # fmt: skip
    Case("pipe-label-ids-int", lambda env: env.pipe.get_label_ids(5), TypeError, r"`label` must be a class", "pipe"),
    Case("pipe-generator-int", pipe_call(generator=42), TypeError, r"`generator` must be None.*got 42", "pipe"),
    Case(
        "pipe-generator-list-of-int",
        pipe_call(generator=[torch.Generator(), 1]),
        TypeError,
        r"`generator` must be None, a torch.Generator or a list",
        "pipe",
    ),  # fmt: skip
    Case(
        "pipe-scheduler",
        lambda env: FunLoRAPipeline(env.pipe.unet, DDPMScheduler()),
        TypeError,
        r"FlowMatchEulerDiscreteScheduler or FlowMatchHeunDiscreteScheduler.*DDPMScheduler",
        "pipe",
    ),  # fmt: skip
    Case(
        "pipe-unknown-task",
        lambda env: FunLoRAPipeline.from_pretrained(env.folder, tasks=["task_9"]),
        ValueError,
        r"`tasks` names \['task_9'\]",
        "folder",
    ),  # fmt: skip
    Case(
        "pipe-dtypes-disagree",
        lambda env: FunLoRAPipeline.from_pretrained(env.folder, dtype=torch.bfloat16, torch_dtype=torch.float16),
        ValueError,
        r"disagree",
        "folder",
    ),  # fmt: skip
]

# ---------------------------------------------------------------------------------------------------------------------
# The run folder: every file hashed, the index checked, class ids compared in order


def load_run(env) -> None:
    FunLoRAPipeline.from_pretrained(env.folder)


def tampered(change: Callable[[Path], None], rehashed: bool = False) -> Callable:
    def act(env) -> None:
        change(env.folder)
        if rehashed:
            rehash(env.folder)
        env.digest = tree_digest(env.folder)
        load_run(env)

    return act


def set_backbone_activation(folder: Path) -> None:
    edit_json(folder / "backbone" / "config.json", lambda d: d.update(act_fn="relu"))


def permute_class_ids(folder: Path) -> None:
    edit_json(folder / "task_1" / "adapter_config.json", lambda d: d.update(class_ids=[3, 2]))


def drop_backbone_hash(folder: Path) -> None:
    edit_json(folder / INDEX_FILE, lambda d: d["sha256"].pop("backbone/diffusion_pytorch_model.safetensors"))


def string_class_ids(folder: Path) -> None:
    edit_json(folder / INDEX_FILE, lambda d: d["tasks"][0].update(class_ids=["0", "1"]))


RUN_FOLDER_CASES = [
    Case(
        "run-backbone-config-edited",
        tampered(set_backbone_activation),
        ValueError,
        r"backbone/config.json: sha256 .* does not match",
        "folder",
    ),  # fmt: skip
    Case(
        "run-adapter-config-edited",
        tampered(lambda f: edit_json(f / "task_1" / "adapter_config.json", lambda d: d.update(function="rshift"))),
        ValueError,
        r"task_1/adapter_config.json: sha256 .* does not match",
        "folder",
    ),  # fmt: skip
    Case(
        "run-class-ids-permuted",
        tampered(permute_class_ids, rehashed=True),
        ValueError,
        r"class_ids \[3, 2\] differ from \[2, 3\].*order matters",
        "folder",
    ),  # fmt: skip
    Case(
        "run-backbone-hash-removed",
        tampered(drop_backbone_hash),
        ValueError,
        r"backbone/diffusion_pytorch_model.safetensors has no sha256",
        "folder",
    ),  # fmt: skip
    Case(
        "run-class-names-list",
        tampered(lambda f: edit_json(f / INDEX_FILE, lambda d: d.update(class_names=[]))),
        ValueError,
        r"funlora.json is malformed.*class_names must map class ids to names, got \[\]",
        "folder",
    ),  # fmt: skip
    Case(
        "run-backbone-number",
        tampered(lambda f: edit_json(f / INDEX_FILE, lambda d: d.update(backbone=5))),
        ValueError,
        r"funlora.json is malformed.*backbone must name the backbone's folder, got 5",
        "folder",
    ),  # fmt: skip
    Case(
        "run-no-tasks",
        tampered(lambda f: edit_json(f / INDEX_FILE, lambda d: d.update(tasks=[]))),
        ValueError,
        r"funlora.json is malformed.*tasks must be a non-empty list",
        "folder",
    ),  # fmt: skip
    Case(
        "run-string-class-ids",
        tampered(string_class_ids),
        ValueError,
        r"funlora.json is malformed.*class_ids",
        "folder",
    ),  # fmt: skip
    Case(
        "run-format-version",
        tampered(lambda f: edit_json(f / INDEX_FILE, lambda d: d.update(format_version=99))),
        ValueError,
        r"unknown format_version 99",
        "folder",
    ),  # fmt: skip
    Case(
        "run-index-not-json",
        tampered(lambda f: (f / INDEX_FILE).write_text("{")),
        ValueError,
        r"funlora.json is not valid JSON",
        "folder",
    ),  # fmt: skip
    Case(
        "run-adapter-config-not-json",
        tampered(lambda f: (f / "task_1" / "adapter_config.json").write_text("{"), rehashed=True),
        ValueError,
        r"task_1/adapter_config.json is no readable FunLoRA adapter config",
        "folder",
    ),  # fmt: skip
    Case(
        "run-task-folder-missing",
        tampered(lambda f: shutil.rmtree(f / "task_2")),
        ValueError,
        r"task_2/adapter_\w+\.\w+ is missing",
        "folder",
    ),  # fmt: skip
    Case(
        "run-adapter-truncated",
        tampered(lambda f: (f / "task_1" / "adapter_model.safetensors").write_bytes(b"x" * 9), rehashed=True),
        ValueError,
        r"task_1/adapter_model.safetensors cannot be read as safetensors",
        "folder",
    ),  # fmt: skip
]


def attach_with_a_nan_tensor(env) -> None:
    path = env.folder / "task_1" / "adapter_model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, path)
    rehash(env.folder)
    attach_tasks(env.unet, env.folder)  # the UNet trains (requires_grad): wrapping it froze it until the refusal


def save_changed_run(**kwargs) -> Callable:
    """save_run of the folder's model with task_1 changed (a rewrite would show in the files), and `kwargs`."""

    def act(env) -> None:
        with torch.no_grad():
            for name, param in env.pipe.unet.named_parameters():
                if ".funlora_alpha.task_1" in name:
                    param.add_(1.0)
        save_run(env.pipe.unet, env.folder, **kwargs)

    return act


RUN_FOLDER_CASES += [
    Case(
        "save-run-scheduler",
        save_changed_run(scheduler="euler"),
        TypeError,
        r"`scheduler` must be a flow-matching scheduler.* got str",
        "folder",
    ),  # fmt: skip
    Case(
        "save-run-ddpm-scheduler",
        save_changed_run(scheduler=DDPMScheduler()),
        TypeError,
        r"`scheduler` must be a flow-matching scheduler.* got DDPMScheduler",
        "folder",
    ),  # fmt: skip
    Case(
        "save-run-metrics",
        save_changed_run(metrics={"cas": 0.9}),
        TypeError,
        r"`metrics` must be a ContinualMetrics or None, got dict",
        "folder",
    ),  # fmt: skip
    Case(
        "save-run-class-names",
        save_changed_run(class_names={"zero": "T-shirt"}),
        TypeError,
        r"`class_names` maps non-negative integer class ids to str names, got \[\('zero', 'T-shirt'\)\]",
        "folder",
    ),  # fmt: skip
    Case(
        "attach-nan-tensor",
        attach_with_a_nan_tensor,
        ValueError,
        r"task_1/adapter_model.safetensors: .*(finite|nan)",
        "unet",
    ),  # fmt: skip
    Case(
        "attach-into-an-adapted-unet",
        lambda env: attach_tasks(env.small.base_model.model, env.folder),
        ValueError,
        r"`unet` holds FunLoRA adapters already \(\['other'\]\).*load_backbone",
        "small",
    ),  # fmt: skip
]

# ---------------------------------------------------------------------------------------------------------------------
# The `funlora` command: one line and exit status 2


def sample(env, *argv) -> None:
    cli.main(["sample", str(env.folder), *argv])


CLI_CASES = [
    Case(
        "cli-output-folder",
        lambda env: sample(env, "--classes", "0", "--output", str(env.tmp)),
        SystemExit,
        r"--output must name a .png file, got '.*'",
        "folder",
    ),  # fmt: skip
    Case(
        "cli-output-jpg",
        lambda env: sample(env, "--classes", "0", "--output", "g.jpg"),
        SystemExit,
        r"--output must name a .png file",
        "folder",
    ),  # fmt: skip
    Case(
        "cli-unknown-class",
        lambda env: sample(env, "--classes", "9", "--output", "g.png"),
        SystemExit,
        r"--classes \[9\] belong to no task",
        "folder",
    ),  # fmt: skip
    Case(
        "cli-string-class-ids",
        tampered(string_class_ids)
        if False
        else (
            lambda env: (
                string_class_ids(env.folder),
                setattr(env, "digest", tree_digest(env.folder)),
                sample(env, "--classes", "0", "--output", str(env.tmp / "g.png")),
            )
        ),
        SystemExit,
        r"funlora.json is malformed",
        "folder",
    ),  # fmt: skip
    Case("cli-no-output", lambda env: sample(env, "--classes", "0"), SystemExit, r"--output is required", "folder"),
]

# ---------------------------------------------------------------------------------------------------------------------
# examples/train.py: every flag checked before anything is written


def train(env, *argv) -> None:
    module = load_example("train")
    module.main(module.parse_args([*TINY_TRAIN_ARGS, "--report_to", "none", "--output_dir", str(env.out), *argv]))


def killed_before_first_checkpoint(env) -> None:
    env.out.mkdir()
    (env.out / INDEX_FILE).write_text("{}")  # what a run stopped before its first checkpoint leaves
    env.digest = tree_digest(env.out)
    train(env, "--resume_from_checkpoint", "latest")


TRAIN_CASES = [
    Case(
        "train-lr-scheduler",
        lambda env: train(env, "--lr_scheduler", "bogus"),
        SystemExit,
        r"--lr_scheduler: invalid choice: 'bogus'",
        "out",
    ),  # fmt: skip
    Case(
        "train-negative-lr",
        lambda env: train(env, "--learning_rate", "-1"),
        SystemExit,
        r"--learning_rate=-1.0 must be > 0",
        "out",
    ),  # fmt: skip
    Case(
        "train-zero-adapter-lr",
        lambda env: train(env, "--adapter_learning_rate", "0"),
        SystemExit,
        r"--adapter_learning_rate=0.0 must be > 0",
        "out",
    ),  # fmt: skip
    Case(
        "train-negative-warmup",
        lambda env: train(env, "--lr_warmup_steps", "-5"),
        SystemExit,
        r"--lr_warmup_steps=-5 must be >= 0",
        "out",
    ),  # fmt: skip
    Case("train-zero-threads", lambda env: train(env, "--num_threads", "0"), SystemExit, r"--num_threads=0", "out"),
    Case(
        "train-fp16-on-cpu",
        lambda env: train(env, "--mixed_precision", "fp16"),
        SystemExit,
        r"--mixed_precision fp16 needs a CUDA GPU",
        "out",
    ),  # fmt: skip
    Case(
        "train-unbalanced-batch",
        lambda env: train(env, "--train_batch_size", "7"),
        SystemExit,
        r"--train_batch_size=7 is no multiple of the class count",
        "out",
    ),  # fmt: skip
    Case(
        "train-init-inf",
        lambda env: train(env, "--init_a_std", "inf"),
        SystemExit,
        r"`init_a_std` must be a finite number",
        "out",
    ),  # fmt: skip
    Case("train-beta", lambda env: train(env, "--adam_beta1", "1.5"), SystemExit, r"--adam_beta1=1.5", "out"),
    Case(
        "train-resume-nothing",
        killed_before_first_checkpoint,
        SystemExit,
        r"no checkpoint-N folder to resume from .* --overwrite_output_dir",
        "out",
    ),  # fmt: skip
]


def output_dir_is_a_file(env) -> None:
    env.out.write_text("not a folder")
    env.digest = {"file": hashlib.sha256(env.out.read_bytes()).hexdigest()}
    train(env)


TRAIN_CASES.append(Case("train-output-file", output_dir_is_a_file, SystemExit, r"--output_dir=.* is a file", "out"))

ALL_CASES = (
    CONFIG_CASES
    + INJECTION_CASES
    + LABEL_CASES
    + MERGE_CASES
    + LOAD_CASES
    + PIPELINE_CASES
    + RUN_FOLDER_CASES
    + CLI_CASES
    + TRAIN_CASES
)


@pytest.fixture
def env(tmp_path, run_folder):
    model = two_tasks()
    small = get_peft_model(make_unet("shortcut"), FunLoRAConfig(class_ids=[7]), "other")
    pipe = load_pipeline(run_folder)
    return SimpleNamespace(
        tmp=tmp_path,
        model=model,
        unet_of_model=model.base_model.model,
        unet=make_unet("attn"),
        grouped=with_grouped_conv(),
        small=small,
        folder=run_folder,
        pipe=pipe,
        out=tmp_path / "out",
    )


def test_the_matrix_has_every_entry_point():
    assert len(ALL_CASES) >= 60 and len({case.id for case in ALL_CASES}) == len(ALL_CASES)


@pytest.mark.parametrize("case", ALL_CASES, ids=[case.id for case in ALL_CASES])
def test_bad_input_is_refused_and_changes_nothing(case, env, monkeypatch, capsys):
    monkeypatch.chdir(env.tmp)
    snapshots = {
        "model": lambda: model_snapshot(env.model),
        "unet": lambda: model_snapshot(env.unet),
        "grouped": lambda: model_snapshot(env.grouped),
        "small": lambda: model_snapshot(env.small),
        "pipe": lambda: model_snapshot(env.pipe.unet),
        "folder": lambda: tree_digest(env.folder),
    }
    before = snapshots[case.keeps]() if case.keeps in snapshots else None
    with pytest.raises(case.error) as raised:
        case.act(env)
    message = str(raised.value.code if isinstance(raised.value, SystemExit) else raised.value)
    message += capsys.readouterr().err
    assert re.search(case.match, message, flags=re.S), message
    if case.keeps in ("model", "unet", "grouped", "small", "pipe"):
        before = getattr(env, "before", before)  # set by cases whose state of reference comes after a first step
        assert same_model(before, snapshots[case.keeps]()), f"{case.id} changed the {case.keeps}"
    elif case.keeps == "folder":
        expected = getattr(env, "digest", before)
        assert tree_digest(env.folder) == expected, f"{case.id} changed the run folder"
    elif case.keeps == "out":
        if hasattr(env, "digest") and env.out.is_dir():
            assert tree_digest(env.out) == env.digest, f"{case.id} wrote into the output folder"
        elif hasattr(env, "digest"):
            assert {"file": hashlib.sha256(env.out.read_bytes()).hexdigest()} == env.digest
        else:
            assert not env.out.exists(), f"{case.id} created {env.out}"
    elif case.keeps == "first-merge":
        assert same_model(env.after_first, model_snapshot(env.unet_of_model))
    elif case.keeps == "merged-0":
        layers = [m for m in env.model.modules() if isinstance(m, FunLoRALayer)]
        assert all(layer._merged_class == 0 for layer in layers)


def test_default_targets_skip_grouped_convs():
    unet = with_grouped_conv()
    model = get_peft_model(unet, FunLoRAConfig(class_ids=[0]), "task_0")
    wrapped = {name for name, m in model.named_modules() if isinstance(m, FunLoRALayer)}
    assert not any(name.endswith("depthwise") for name in wrapped) and any(n.endswith("conv_in") for n in wrapped)


def test_a_failed_load_onto_an_adapted_unet_leaves_its_router_as_it_was(tmp_path):
    model = two_tasks()
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    (tmp_path / "task_1" / "adapter_model.safetensors").write_bytes(b"x" * 9)
    other = get_peft_model(make_unet("attn"), FunLoRAConfig(class_ids=[7], init_alpha=0.2), "other")
    unet = other.base_model.model
    router = unet.__dict__["_funlora_router"]
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        PeftModel.from_pretrained(unet, tmp_path / "task_1", adapter_name="task_1")
    assert router._peers == [] and unet.__dict__["_funlora_router"] is router
    assert list(router._all_configs()) == ["other"]


def test_a_failed_load_leaves_a_usable_plain_unet(tmp_path):
    """After `PeftModel.from_pretrained` refused the files, the UNet runs as before (no hook, no wrapped conv)."""
    model = two_tasks()
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    (tmp_path / "task_1" / "adapter_model.safetensors").unlink()
    unet = make_unet("attn")
    x_t, t = make_inputs(unet, batch_size=2)
    with torch.no_grad():
        before = unet(x_t, t).sample
    with pytest.raises(ValueError, match="is missing"):
        PeftModel.from_pretrained(unet, tmp_path / "task_1", adapter_name="task_1")
    with torch.no_grad():
        assert torch.equal(unet(x_t, t).sample, before)
    assert os.path.isdir(tmp_path / "task_0")
