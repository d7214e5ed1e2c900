"""Benchmark FunLoRA adapters against the bare UNet: training-step time, sampling time and peak memory.

Run from the repository root (the script finds `funlora_peft` in the checkout when it is not installed):

    python examples/benchmark_adapter.py                    # CPU, 16x16 and 32x32 UNets (about 7 min, shared 2 cores)
    python examples/benchmark_adapter.py --quick            # the 16x16 UNet only (about 1 min)
    python examples/benchmark_adapter.py --device cuda --output benchmark.json   # GPU; also write the results as JSON
    python examples/benchmark_adapter.py --device cuda --sizes 32x32 --classes 20 --compile cos --precision both
                                                            # on a GPU: CIFAR-size UNet, 20 classes, bf16 + fp32
    bash examples/gpu_benchmarks.sh OUTPUT_DIR              # the GPU checks in one script (this one and the
                                                            # CIFAR-100 protocol's steps per second)

On a CPU shared with other jobs the script runs with 1 torch thread (see `--num_threads`): with several threads, OpenMP
threads that lose their core to another process stall the others at every parallel region, and steps run up to 10x
slower and erratically.

For two `UNet2DModel` sizes ("16x16": 35 convs, batch 64; "32x32": the 35.8 M-parameter CIFAR UNet, 65 convs, batch
16 on CPU and 128 on GPU) and each function family (cos, rshift and power with p = 10, linear with p = 1), with
adapters on every conv, it measures:

1. a training step (forward + backward of the MSE loss against a random target) on a batch mixing 10 classes, in the
   continual setting (frozen adapter task_0 with classes 0-4, trained adapter task_1 with classes 5-9, frozen
   backbone), with the classes laid out as the training script draws them (class-balanced, interleaved), divided by
   a full fine-tuning step of the bare UNet (all parameters trainable) on the same batch. Target <= 1.2 (goal 1.0:
   no backbone weight gradient is needed).
2. the sampling forward (no_grad) of a single-class batch after `merge_adapter(class_label=7)`, divided by the bare
   UNet forward (target 1.0 up to noise), and of a batch mixing 10 classes in random order without merging (the class
   weights built once, as in a sampling loop; target <= 1.1), also against PEFT's own LoRA with one rank-1 adapter
   per class on the same convs and the same batch through `adapter_names=` (FunLoRA should be faster).
3. the training step with 1,000 classes loaded (100 adapters of 10 classes, the last one trained; the batch mixes 5
   classes of the last adapter and 5 classes of 5 older ones) divided by the 10-class step (target <= 1.1). By default
   only on the 16x16 UNet on CPU (injecting 100 adapters into the 32x32 UNet and stepping it takes minutes there).
4. the peak memory of every measurement (method in the table caption); training target <= 1.3x full fine-tuning.
5. the aten ops of one step, counted with a `TorchDispatchMode` (on a GPU every op that is not a view is a kernel
   launch), on the 16x16 UNet at batch 80 with a 20-class adapter trained with the backbone (task 0): a training step
   with 1, 2, 10 and 20 classes in the batch against the bare UNet's (targets: convolution calls equal to the bare
   UNet's, all ops <= 1.6x), and a sampling forward with the class weights built (target <= 1.2x).
6. with --compile [FAMILY ...] (every family when none is named), the same training step and mixed sampling forward
   of `torch.compile(model)` (inductor), against eager.

Every measurement runs round-robin with its baseline: each round calls the bare UNet right before the FunLoRA models
of each function, and a ratio is the median over rounds of the per-round ratios, so that drifts in the load of a shared
machine hit both alike.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

if importlib.util.find_spec("funlora_peft") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers  # noqa: E402
import peft  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import funlora_peft  # noqa: E402
from funlora_peft import FunLoRAConfig, FunLoRALayer  # noqa: E402
from funlora_peft.run_folder import attach_tasks, save_run  # noqa: E402

FAMILIES: dict[str, int] = {"cos": 10, "rshift": 10, "power": 10, "linear": 1}
"""Function family -> number of functions p."""

NUM_MIXED_CLASSES = 10
MERGED_CLASS = 7  # owned by the trained adapter task_1 of the 10-class model
MANY_ADAPTERS = 100
CLASSES_PER_ADAPTER = 10
# The 1,000-class batch: 5 classes of the last (trained) adapter and one class of each of 5 older adapters.
MANY_CLASSES_BATCH = (990, 991, 992, 993, 994, 0, 251, 502, 753, 984)


@dataclass
class UNetSpec:
    """One benchmarked UNet2DModel size."""

    name: str
    config: dict
    batch_cpu: int
    batch_gpu: int

    def batch_size(self, device: torch.device) -> int:
        return self.batch_gpu if device.type == "cuda" else self.batch_cpu


UNET_SPECS: dict[str, UNetSpec] = {
    "16x16": UNetSpec(
        name="16x16",
        config=dict(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        ),
        batch_cpu=64,
        batch_gpu=64,
    ),
    "32x32": UNetSpec(
        name="32x32",
        config=dict(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 256, 256),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        ),
        batch_cpu=16,
        batch_gpu=128,
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# Result records


@dataclass
class MachineInfo:
    """Where the benchmark ran."""

    device: str
    device_name: str
    num_threads: int
    torch_version: str
    diffusers_version: str
    peft_version: str
    funlora_peft_version: str
    python_version: str
    platform: str
    load_average: float | None
    cpu_count: int


@dataclass
class ModelInfo:
    """One UNet size: its parameters, adapted convs and the adapter cost per class."""

    size: str
    batch_size: int
    unet_parameters: int
    adapted_convs: int
    extra_parameters_per_class: dict[str, int]
    many_classes_build_seconds: dict[str, float] = field(default_factory=dict)
    many_classes_load_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Measurement:
    """The timed calls of one case: seconds per timed round and peak memory in bytes (None when not measured)."""

    key: str
    times_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


@dataclass
class Comparison:
    """One row of the results table: a FunLoRA measurement divided by its baseline (median of per-round ratios)."""

    size: str
    function: str
    measurement: str
    baseline: str
    time_ms: float
    baseline_ms: float
    ratio: float
    ratio_min: float
    ratio_max: float
    target: str
    passed: bool
    peak_mib: float | None
    baseline_peak_mib: float | None


@dataclass
class BenchmarkReport:
    """Everything the benchmark measured; `--output` writes it as JSON."""

    machine: MachineInfo
    settings: dict
    memory_method: str
    models: list[ModelInfo]
    comparisons: list[Comparison]
    measurements: dict[str, dict[str, Measurement]]
    notes: list[str]
    profiles: dict[str, str] = field(default_factory=dict)
    op_counts: dict[str, dict] = field(default_factory=dict)
    total_seconds: float = 0.0
    process_peak_rss_mib: float = 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Peak memory


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of the tensor storages created while the mode is active and alive at the same time.

    Every op's outputs go through `__torch_dispatch__` (forward and autograd backward alike); a storage is counted from
    the op that creates it until it is freed (a weakref finalizer on the storage). Storages that existed before (the
    parameters, buffers and inputs passed as `exclude`) are never counted, nor are scratch buffers that kernels
    allocate internally (e.g. oneDNN workspaces), which never become tensors.
    """

    def __init__(self, exclude: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse tensors
            return
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self._excluded or ptr in self._live:
            return
        self._live[ptr] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, ptr)

    def _release(self, ptr: int) -> None:
        self.current -= self._live.pop(ptr, 0)


def memory_method(device: torch.device) -> str:
    """How peak memory is measured on `device`, for the table caption."""
    if device.type == "cuda":
        return (
            "torch.cuda.max_memory_allocated() during the call minus torch.cuda.memory_allocated() "
            "before it (model, inputs and existing gradients excluded), max over the timed rounds"
        )
    return (
        "the peak total size of the tensor storages created during the call and alive at the same "
        "time (activations, saved tensors, per-class weights, gradients; parameters and inputs excluded), tracked "
        "with a TorchDispatchMode in the first warm-up round; deterministic, but it misses scratch buffers that "
        "kernels allocate internally (oneDNN workspaces)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Models and cases


def make_unet(spec: UNetSpec, seed: int, device: torch.device) -> UNet2DModel:
    """A freshly initialised UNet2DModel of `spec`, deterministic for `seed`."""
    torch.manual_seed(seed)
    return UNet2DModel(**spec.config).to(device)


def funlora_config(function: str, class_ids: list[int], seed: int) -> FunLoRAConfig:
    """A FunLoRA config on every conv; alpha starts at 0.1 (not the identity), so merged weights differ from W0."""
    return FunLoRAConfig(
        class_ids=class_ids,
        function=function,
        num_functions=FAMILIES[function],
        init_alpha=0.1,
        init_seed=seed,
    )


def make_funlora_model(
    unet: UNet2DModel, function: str, num_adapters: int, classes_per_adapter: int, seed: int
) -> tuple[PeftModel, float]:
    """Wrap a copy of `unet` with adapters task_0, task_1, ... of consecutive classes; only the last one is trainable.

    Returns the model and the seconds spent injecting the adapters.
    """
    model_copy = copy.deepcopy(unet)
    start = time.perf_counter()
    model = get_peft_model(
        model_copy, funlora_config(function, list(range(classes_per_adapter)), seed), adapter_name="task_0"
    )
    for index in range(1, num_adapters):
        first = index * classes_per_adapter
        classes = list(range(first, first + classes_per_adapter))
        model.add_adapter(f"task_{index}", funlora_config(function, classes, seed + index))
    last = f"task_{num_adapters - 1}"
    model.set_adapter(last)
    seconds = time.perf_counter() - start
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    wrong = [name for name in trainable if not name.endswith(f".{last}")]
    if wrong or not trainable:
        raise RuntimeError(
            f"Expected only the tensors of {last!r} to be trainable, got e.g. {(wrong or ['none'])[:3]}."
        )
    return model, seconds


def time_run_loading(model: PeftModel, bare: UNet2DModel) -> float:
    """Seconds to attach every task of `model`, saved as a run folder, to a copy of `bare` (all files checked)."""
    with tempfile.TemporaryDirectory() as folder:
        save_run(model, Path(folder) / "run")
        unet = copy.deepcopy(bare)
        start = time.perf_counter()
        attach_tasks(unet, Path(folder) / "run")
        return time.perf_counter() - start


def extra_parameters_per_class(model: PeftModel, adapter_name: str) -> int:
    """Adapter parameters of one class over all adapted layers: numel of `adapter_name`'s tensors / its classes."""
    total = sum(param.numel() for name, param in model.named_parameters() if name.endswith(f".{adapter_name}"))
    return total // len(model.peft_config[adapter_name].class_ids)


def count_adapted_convs(model: nn.Module) -> int:
    """Number of convs wrapped by FunLoRA."""
    return sum(isinstance(module, FunLoRALayer) for module in model.modules())


@dataclass
class Case:
    """One timed call and what surrounds it (untimed): `setup` before and `teardown` after."""

    key: str
    call: Callable[[], None]
    tensors: Callable[[], list[torch.Tensor]]
    setup: Callable[[], None] | None = None
    teardown: Callable[[], None] | None = None


def existing_tensors(model: nn.Module, *inputs: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    """The tensors that exist before a call (parameters, buffers, inputs), excluded from its peak memory."""

    def collect() -> list[torch.Tensor]:
        tensors = [*model.parameters(), *model.buffers(), *inputs]
        tensors += [param.grad for param in model.parameters() if param.grad is not None]
        return tensors

    return collect


def _autocast(device: torch.device, precision: str):
    """bf16 autocast for `precision == "bf16"`, nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_case(
    key: str,
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor | None,
    precision: str = "fp32",
) -> Case:
    """Forward + backward of the MSE loss; gradients are reset to None before every call (untimed)."""

    def setup() -> None:
        model.train()
        model.zero_grad(set_to_none=True)

    def call() -> None:
        kwargs = {} if labels is None else {"class_labels": labels}
        with _autocast(x.device, precision):
            prediction = model(x, t, **kwargs).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), target)
        loss.backward()

    inputs = [x, t, target] + ([] if labels is None else [labels])
    return Case(key, call, existing_tensors(model, *inputs), setup=setup)


def forward_case(
    key: str,
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    merge_class: int | None = None,
    precision: str = "fp32",
    adapter_names: list[str] | None = None,
) -> Case:
    """A sampling forward under no_grad; with `merge_class`, that class is merged before and unmerged after.

    `adapter_names` routes a PEFT LoRA model's samples to their adapters (PEFT's mixed-batch inference).
    """

    def setup() -> None:
        model.eval()
        if merge_class is not None:
            model.base_model.merge_adapter(class_label=merge_class)

    def teardown() -> None:
        if merge_class is not None:
            model.base_model.unmerge_adapter()

    def call() -> None:
        kwargs = {} if labels is None else {"class_labels": labels}
        if adapter_names is not None:
            kwargs = {"adapter_names": adapter_names}
        with torch.no_grad(), _autocast(x.device, precision):
            model(x, t, **kwargs)

    inputs = [x, t] + ([] if labels is None else [labels])
    return Case(key, call, existing_tensors(model, *inputs), setup=setup, teardown=teardown)


def make_lora_model(unet: UNet2DModel, class_ids: list[int], seed: int) -> PeftModel:
    """PEFT's LoRA peer: one rank-1 adapter `class_{c}` per class on every conv FunLoRA adapts (a copy of `unet`)."""
    targets = [name for name, module in unet.named_modules() if isinstance(module, nn.Conv2d)]
    config = dict(r=1, lora_alpha=1, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(unet), LoraConfig(**config), adapter_name=f"class_{class_ids[0]}")
    for class_id in class_ids[1:]:
        model.add_adapter(f"class_{class_id}", LoraConfig(**config))
    return model


def check_merge(model: PeftModel, x: torch.Tensor, t: torch.Tensor, class_label: int) -> str | None:
    """None when the merged forward of `class_label` matches the routed one, else a note saying by how much."""
    labels = torch.full((x.shape[0],), class_label, dtype=torch.long, device=x.device)
    model.eval()
    with torch.no_grad():
        routed = model(x, t, class_labels=labels).sample
        model.base_model.merge_adapter(class_label=class_label)
        try:
            merged = model(x, t, class_labels=labels).sample
        finally:
            model.base_model.unmerge_adapter()
    error = (merged - routed).abs().max().item()
    scale = routed.abs().max().item()
    if error > 1e-4 * max(scale, 1.0):
        return f"merged and routed outputs of class {class_label} differ by {error:.3g} (max |output| {scale:.3g})"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_rounds(
    cases: list[Case], warmup: int, repeats: int, device: torch.device, log: Callable[[str], None]
) -> dict[str, Measurement]:
    """Call every case once per round, round-robin: `warmup` untimed rounds, then `repeats` timed ones.

    On CPU the first warm-up round also measures peak memory with `TensorMemoryTracker`; on CUDA every timed round
    reads the allocator's peak.
    """
    results = {case.key: Measurement(case.key) for case in cases}
    for round_index in range(warmup + repeats):
        timed = round_index >= warmup
        round_start = time.perf_counter()
        for case in cases:
            if case.setup is not None:
                case.setup()
            synchronize(device)
            measurement = results[case.key]
            if device.type == "cuda" and timed:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            if device.type != "cuda" and round_index == 0:
                with TensorMemoryTracker(case.tensors()) as tracker:
                    case.call()
                measurement.peak_bytes = tracker.peak
            else:
                start = time.perf_counter()
                case.call()
                synchronize(device)
                elapsed = time.perf_counter() - start
                if timed:
                    measurement.times_s.append(elapsed)
            if device.type == "cuda" and timed:
                peak = torch.cuda.max_memory_allocated(device) - before
                measurement.peak_bytes = max(measurement.peak_bytes or 0, peak)
            if case.teardown is not None:
                case.teardown()
        kind = "timed" if timed else "warm-up"
        log(f"  round {round_index + 1}/{warmup + repeats} ({kind}): {time.perf_counter() - round_start:.1f} s")
    return results


def profile_case(case: Case, device: torch.device, rows: int) -> str:
    """torch.profiler's table of one call of `case` (ops sorted by self time on `device`)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if case.setup is not None:
        case.setup()
    try:
        with profile(activities=activities) as prof:
            case.call()
            synchronize(device)
    finally:
        if case.teardown is not None:
            case.teardown()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=50)


# ---------------------------------------------------------------------------------------------------------------------
# One UNet size


def benchmark_size(
    spec: UNetSpec,
    functions: list[str],
    many_classes: bool,
    args: argparse.Namespace,
    device: torch.device,
    notes: list[str],
    log: Callable[[str], None],
) -> tuple[ModelInfo, dict[str, Measurement], list[Comparison], dict[str, str]]:
    """Build the bare UNet and the FunLoRA models of `spec`, time them round-robin and compare them.

    Returns the model summary, the raw measurements, the table rows and (with `--profile`) the profiler tables.
    """
    batch = spec.batch_size(device)
    bare = make_unet(spec, args.seed, device)
    info = ModelInfo(
        size=spec.name,
        batch_size=batch,
        unet_parameters=sum(param.numel() for param in bare.parameters()),
        adapted_convs=0,
        extra_parameters_per_class={},
    )
    classes = args.classes
    generator = torch.Generator().manual_seed(args.seed + 1)
    shape = (batch, spec.config["in_channels"], spec.config["sample_size"], spec.config["sample_size"])
    x = torch.randn(shape, generator=generator).to(device)
    target = torch.randn(shape, generator=generator).to(device)
    t = (torch.rand(batch, generator=generator) * 1000).to(device)  # float timesteps, t * 1000 with t in [0, 1]
    # Training batches as the training script draws them (class-interleaved); sampling batches in random order.
    # Labels stay on the CPU, as the training script and the pipeline pass them (no device synchronisation).
    interleaved = torch.arange(batch) % classes
    # The sampling batch: as many samples per class (batch // classes), in random order; unequal counts would be
    # padded to the largest one (`RoutingPlan`), which costs compute in proportion.
    balanced = batch - batch % classes
    shuffled = interleaved[:balanced][torch.randperm(balanced, generator=generator)]
    x_sampling, t_sampling = x[:balanced], t[:balanced]
    labels_1000 = torch.tensor(MANY_CLASSES_BATCH)[torch.arange(batch) % len(MANY_CLASSES_BATCH)]
    labels_single = torch.full((batch,), MERGED_CLASS, dtype=torch.long)

    # One block of cases per function, each with its own calls of the bare baselines right before the FunLoRA calls,
    # so that every ratio compares calls made seconds apart (the load of a shared machine drifts over minutes).
    cases = []
    for precision in args.precisions:
        tag = "" if precision == "fp32" else f"@{precision}"
        if args.lora_peer:
            lora = make_lora_model(bare, list(range(classes)), args.seed)
            names = [f"class_{c}" for c in shuffled.tolist()]
            cases += [
                forward_case(f"lora1{tag}/bare_forward", bare, x_sampling, t_sampling, None, precision=precision),
                forward_case(
                    f"lora1{tag}/forward_mixed",
                    lora,
                    x_sampling,
                    t_sampling,
                    None,
                    precision=precision,
                    adapter_names=names,
                ),
            ]
        for function in functions:
            key = f"{function}{tag}"
            model, _ = make_funlora_model(
                bare, function, num_adapters=2, classes_per_adapter=classes // 2, seed=args.seed
            )
            # The same model again for the sampling cases: a training forward frees the class weights a model keeps
            # for sampling, and the sampling cases time a sampling loop's steps after its first (weights built).
            sampler, _ = make_funlora_model(
                bare, function, num_adapters=2, classes_per_adapter=classes // 2, seed=args.seed
            )
            info.adapted_convs = count_adapted_convs(model)
            info.extra_parameters_per_class[function] = extra_parameters_per_class(model, "task_1")
            problem = check_merge(model, x[:2], t[:2], MERGED_CLASS) if precision == args.precisions[0] else None
            if problem is not None:  # checked once per function (the fp32 models of every precision are the same)
                notes.append(f"{spec.name} {function}: {problem}")
            cases += [
                train_case(f"{key}/bare_train", bare, x, t, target, None, precision),
                train_case(f"{key}/train_10", model, x, t, target, interleaved, precision),
                forward_case(f"{key}/bare_forward", bare, x, t, None, precision=precision),
                forward_case(f"{key}/forward_merged", sampler, x, t, labels_single, MERGED_CLASS, precision),
                forward_case(f"{key}/bare_forward_sampling", bare, x_sampling, t_sampling, None, precision=precision),
                forward_case(f"{key}/forward_mixed", sampler, x_sampling, t_sampling, shuffled, precision=precision),
            ]
            if args.compile is not None and (not args.compile or function in args.compile):
                log(f"  {spec.name} {key}: torch.compile (inductor) ...")
                compiled = torch.compile(model)
                cases += [
                    train_case(f"{key}/train_10_compiled", compiled, x, t, target, interleaved, precision),
                    forward_case(
                        f"{key}/forward_mixed_compiled",
                        compiled,
                        x_sampling,
                        t_sampling,
                        shuffled,
                        precision=precision,
                    ),
                ]
            if many_classes and precision == "fp32":
                log(f"  {spec.name} {function}: injecting {MANY_ADAPTERS} adapters ...")
                many, seconds = make_funlora_model(
                    bare, function, num_adapters=MANY_ADAPTERS, classes_per_adapter=CLASSES_PER_ADAPTER, seed=args.seed
                )
                info.many_classes_build_seconds[function] = seconds
                log(f"  {spec.name} {function}: {MANY_ADAPTERS} adapters injected in {seconds:.1f} s")
                info.many_classes_load_seconds[function] = time_run_loading(many, bare)
                log(
                    f"  {spec.name} {function}: the {MANY_ADAPTERS}-task run folder loaded in "
                    f"{info.many_classes_load_seconds[function]:.1f} s"
                )
                cases.append(train_case(f"{key}/train_1000", many, x, t, target, labels_1000))
    for param in bare.parameters():  # full fine-tuning baseline: every parameter trainable
        param.requires_grad_(True)

    log(f"{spec.name}: batch {batch}, {len(cases)} cases x ({args.warmup} warm-up + {args.repeats} timed) rounds")
    measurements = run_rounds(cases, args.warmup, args.repeats, device, log)
    profiles = {}
    if args.profile:
        by_key = {case.key: case for case in cases}
        first = functions[0]
        for key in (f"{first}/bare_train", f"{first}/train_10", f"{first}/bare_forward", f"{first}/forward_mixed"):
            log(f"  profiling {spec.name} {key}")
            profiles[f"{spec.name} {key}"] = profile_case(by_key[key], device, args.profile_rows)
    tags = ["" if precision == "fp32" else f"@{precision}" for precision in args.precisions]
    keys = [f"{function}{tag}" for tag in tags for function in functions] + [f"lora1{tag}" for tag in tags]
    return info, measurements, compare(spec.name, keys, measurements, args.merged_tolerance, classes), profiles


def compare(
    size: str, functions: list[str], measurements: dict[str, Measurement], merged_tolerance: float, classes: int
) -> list[Comparison]:
    """The rows of the results table for one UNet size (`functions`: the keys of the measured blocks)."""
    rows = []
    mixed = f"{classes} classes"
    plans = [
        ("train_10", f"train step, {mixed}", "bare_train", "full fine-tune step, bare UNet", "<= 1.2", None),
        ("train_10_compiled", f"compiled train step, {mixed}", "train_10", "eager FunLoRA step", "-", None),
        ("forward_merged", "sampling, 1 class merged", "bare_forward", "bare UNet forward", "1.0", merged_tolerance),
        ("forward_mixed", f"sampling, {mixed} unmerged", "bare_forward_sampling", "bare UNet forward", "<= 1.1", None),
        ("forward_mixed_compiled", f"compiled sampling, {mixed}", "forward_mixed", "eager FunLoRA forward", "-", None),
        ("train_1000", "train step, 1,000 classes", "train_10", f"{classes}-class FunLoRA step", "<= 1.1", None),
    ]
    for function in functions:
        for suffix, label, baseline_key, baseline_label, target, tolerance in plans:
            key = f"{function}/{suffix}"
            if key not in measurements:
                continue
            if function.startswith("lora1") and baseline_key == "bare_forward_sampling":
                baseline_key = "bare_forward"
            value, baseline = measurements[key], measurements[f"{function}/{baseline_key}"]
            # Both were called once per round, seconds apart: the median of the per-round ratios cancels slow drifts.
            ratios = [v / b for v, b in zip(value.times_s, baseline.times_s, strict=True)]
            ratio = statistics.median(ratios)
            if function.startswith("lora1"):
                label = f"PEFT LoRA r=1 (one adapter per class), sampling {mixed} via adapter_names"
                target = "-"
            if tolerance is not None:
                passed = abs(ratio - 1.0) <= tolerance
                target = f"1.0 +- {tolerance:g}"
            elif target == "-":
                passed = True
            else:
                passed = ratio <= float(target.split()[-1])
            rows.append(
                Comparison(
                    size=size,
                    function=function,
                    measurement=label,
                    baseline=baseline_label,
                    time_ms=1000 * value.median_s,
                    baseline_ms=1000 * baseline.median_s,
                    ratio=ratio,
                    ratio_min=min(ratios),
                    ratio_max=max(ratios),
                    target=target,
                    passed=passed,
                    peak_mib=_mib(value.peak_bytes),
                    baseline_peak_mib=_mib(baseline.peak_bytes),
                )
            )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Op counts


VIEW_OPS = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "unsqueeze", "squeeze", "expand", "transpose", "t", "permute",
    "detach", "alias", "as_strided", "slice", "select", "unbind", "split", "split_with_sizes", "flatten", "unflatten",
    "_to_copy_noop", "lift_fresh", "promote_types", "result_type",
}  # fmt: skip
"""Ops that only make a new view of existing memory: on a GPU they launch no kernel."""


class OpCounter(TorchDispatchMode):
    """Counts the aten ops (by name) run while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict[str, int]:
        total = sum(self.ops.values())
        views = sum(count for name, count in self.ops.items() if name in VIEW_OPS)
        convs = self.ops.get("convolution", 0) + self.ops.get("convolution_backward", 0)
        return {"ops": total, "kernels": total - views, "convolutions": convs}


def count_ops(call: Callable[[], None]) -> dict[str, int]:
    """The op counts of one call of `call` (after one uncounted warm-up call)."""
    call()
    with OpCounter() as counter:
        call()
    return counter.summary()


OP_COUNT_BATCH = 80
OP_COUNT_CLASSES = (1, 2, 10, 20)


def op_counts(functions: list[str], seed: int, device: torch.device) -> dict[str, dict]:
    """Op counts of a training step (forward + backward) and a sampling forward on the 16x16 UNet at batch 80.

    FunLoRA: one adapter of 20 classes trained with the backbone (task 0), batches of 1, 2, 10 and 20 classes laid
    out as the training script draws them; the sampling forward of 20 classes with the class weights built (a sampling
    loop's steps after its first).
    """
    spec = UNET_SPECS["16x16"]
    bare = make_unet(spec, seed, device)
    generator = torch.Generator().manual_seed(seed)
    shape = (OP_COUNT_BATCH, spec.config["in_channels"], spec.config["sample_size"], spec.config["sample_size"])
    x = torch.randn(shape, generator=generator).to(device)
    t = (torch.rand(OP_COUNT_BATCH, generator=generator) * 1000).to(device)

    def step(model, **kwargs):
        def call():
            model.zero_grad(set_to_none=True)
            model(x, t, **kwargs).sample.square().mean().backward()

        return call

    def forward(model, **kwargs):
        def call():
            with torch.no_grad():
                model(x, t, **kwargs)

        return call

    results = {"bare": {"train": count_ops(step(bare)), "forward": count_ops(forward(bare))}}
    for function in functions:
        model = get_peft_model(copy.deepcopy(bare), funlora_config(function, list(range(20)), seed), "task_0")
        for param in model.parameters():
            param.requires_grad_(True)
        entry = {}
        for classes in OP_COUNT_CLASSES:
            labels = torch.arange(OP_COUNT_BATCH) % classes
            entry[f"train_{classes}"] = count_ops(step(model, class_labels=labels))
        entry["forward_20"] = count_ops(forward(model, class_labels=torch.arange(OP_COUNT_BATCH) % 20))
        results[function] = entry
    return results


def format_op_counts(counts: dict[str, dict]) -> list[str]:
    bare_train, bare_forward = counts["bare"]["train"], counts["bare"]["forward"]
    lines = [
        "",
        f"Aten ops of one step on the 16x16 UNet at batch {OP_COUNT_BATCH} (TorchDispatchMode; kernels = ops that "
        "are not views, i.e. kernel launches on a GPU). Bare UNet: training step (forward + backward, full "
        f"fine-tuning) {bare_train['ops']:,} ops, {bare_train['kernels']:,} kernels, {bare_train['convolutions']} "
        f"convolution calls; forward {bare_forward['ops']:,} ops, {bare_forward['kernels']:,} kernels.",
        "",
        "| function | training step: classes in the batch | ops (x bare) | kernels (x bare) "
        "| convolution calls (bare) |",
        "|---|---|---:|---:|---:|",
    ]
    for function, entry in counts.items():
        if function == "bare":
            continue
        for classes in OP_COUNT_CLASSES:
            c = entry[f"train_{classes}"]
            lines.append(
                f"| {function} | {classes} | {c['ops']:,} ({c['ops'] / bare_train['ops']:.2f}) | "
                f"{c['kernels']:,} ({c['kernels'] / bare_train['kernels']:.2f}) | {c['convolutions']} "
                f"({bare_train['convolutions']}) |"
            )
        c = entry["forward_20"]
        lines.append(
            f"| {function} | sampling forward, 20 classes, weights built | {c['ops']:,} "
            f"({c['ops'] / bare_forward['ops']:.2f}) | {c['kernels']:,} "
            f"({c['kernels'] / bare_forward['kernels']:.2f}) | {c['convolutions']} ({bare_forward['convolutions']}) |"
        )
    return lines


def _mib(num_bytes: int | None) -> float | None:
    return None if num_bytes is None else num_bytes / 2**20


# ---------------------------------------------------------------------------------------------------------------------
# Output


def machine_info(device: torch.device) -> MachineInfo:
    """Versions, device name and thread count."""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return MachineInfo(
        device=str(device),
        device_name=device_name,
        num_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        diffusers_version=diffusers.__version__,
        peft_version=peft.__version__,
        funlora_peft_version=funlora_peft.__version__,
        python_version=platform.python_version(),
        platform=platform.platform(),
        load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        cpu_count=os.cpu_count() or 1,
    )


def format_report(report: BenchmarkReport) -> str:
    """The markdown tables printed at the end of the run."""
    m = report.machine
    lines = [
        "## FunLoRA adapter benchmark",
        "",
        f"Machine: {m.device} ({m.device_name}), {m.num_threads} torch threads, {m.cpu_count} CPU cores, 1-minute "
        f"load average {_fmt_load(m.load_average)} at start; torch {m.torch_version}, "
        f"diffusers {m.diffusers_version}, peft {m.peft_version}, funlora-peft {m.funlora_peft_version}, "
        f"python {m.python_version}, {m.platform}.",
        "",
        "| UNet | parameters | adapted convs | batch | extra parameters per class (all adapted convs) "
        "| 100-adapter injection | 100-task run folder loaded |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for info in report.models:
        extra = ", ".join(
            f"{function} {count:,} ({100 * count / info.unet_parameters:.2f}%)"
            for function, count in info.extra_parameters_per_class.items()
        )
        build = ", ".join(f"{f} {s:.1f} s" for f, s in info.many_classes_build_seconds.items()) or "not run"
        load = ", ".join(f"{f} {s:.1f} s" for f, s in info.many_classes_load_seconds.items()) or "not run"
        row = [info.size, f"{info.unet_parameters:,}", info.adapted_convs, info.batch_size, extra, build, load]
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    lines += [
        "",
        "| UNet | function | measurement | time (ms) | baseline | baseline (ms) | ratio | ratio range | target | ok "
        "| peak (MiB) | baseline peak (MiB) |",
        "|---|---|---|---:|---|---:|---:|---|---|---|---:|---:|",
    ]
    for row in report.comparisons:
        lines.append(
            f"| {row.size} | {row.function} | {row.measurement} | {row.time_ms:.1f} | {row.baseline} "
            f"| {row.baseline_ms:.1f} | {row.ratio:.2f} | {row.ratio_min:.2f}-{row.ratio_max:.2f} | {row.target} "
            f"| {'yes' if row.passed else 'NO'} "
            f"| {_fmt_mib(row.peak_mib)} | {_fmt_mib(row.baseline_peak_mib)} |"
        )
    s = report.settings
    lines += [
        "",
        f"Times: median of {s['repeats']} timed rounds after {s['warmup']} warm-up round(s); each round calls every "
        "measurement once, each FunLoRA measurement right after its own call of the baseline; ratio = median of the "
        "per-round ratios (range: min-max over rounds). Training steps: forward + backward of the MSE loss, "
        "gradients reset to None before each step, no optimizer step; FunLoRA models have a frozen backbone, a frozen "
        f"adapter task_0 (the first {s['classes'] // 2} classes) and a trained adapter task_1 (the next "
        f"{s['classes'] // 2}), the training batch class-interleaved as the training script draws it, the sampling "
        "batch in random order with batch // classes samples of each class (1,000 classes: 100 adapters, task_99 "
        "trained). Sampling: torch.no_grad, class 7 "
        f"merged for the single-class batch. Float timesteps, seed {s['seed']}. Peak memory: {report.memory_method}.",
    ]
    if report.op_counts:
        lines += format_op_counts(report.op_counts)
    if report.notes:
        lines += ["", "Notes:"] + [f"- {note}" for note in report.notes]
    for name, table in report.profiles.items():
        lines += ["", f"### torch.profiler: {name}", "", "```", table, "```"]
    lines += [
        "",
        f"Total runtime {report.total_seconds:.0f} s; process peak RSS {report.process_peak_rss_mib:.0f} MiB "
        "(resource.ru_maxrss, whole process).",
    ]
    return "\n".join(lines)


def machine_is_busy(num_threads: int) -> bool:
    """Whether the 1-minute load average plus `num_threads` exceeds the number of CPU cores (False if unknown)."""
    if not hasattr(os, "getloadavg"):
        return False
    return os.getloadavg()[0] + num_threads > (os.cpu_count() or 1) + 0.5


def process_peak_rss_mib() -> float:
    """Peak resident set size of the whole process in MiB (0 where the `resource` module is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _fmt_load(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f}"


def _fmt_mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Benchmark FunLoRA adapters (training step, sampling, memory) against the bare UNet2DModel.",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="Device to run on (default cpu); cuda uses the current GPU.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Smoke run: the 16x16 UNet only (the 32x32 one is skipped unless --sizes names it).",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="Timed rounds per measurement (median reported); default 3.",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="Untimed warm-up rounds (>= 1); on CPU the first one measures peak memory. Default 1.",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=sorted(UNET_SPECS),
        default=None,
        help="UNet sizes to benchmark; default both (16x16 only with --quick).",
    )
    parser.add_argument(
        "--functions",
        nargs="+",
        choices=list(FAMILIES),
        default=list(FAMILIES),
        help="Function families to benchmark (default all four).",
    )
    parser.add_argument(
        "--many_classes",
        choices=["auto", "all", "small", "none"],
        default="auto",
        help="Where to run the 1,000-class (100-adapter) training step: every size, the 16x16 UNet only, or nowhere. "
        "Default auto: every size on CUDA, 16x16 only on CPU (the 32x32 injection and steps take minutes there).",
    )
    parser.add_argument(
        "--merged_tolerance",
        type=float,
        default=0.1,
        help="Pass band of the merged single-class sampling ratio around 1.0 (machine noise); default 0.1.",
    )
    parser.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch.set_num_threads for CPU runs. Default: torch's default, or 1 when the machine is busy at start "
        "(load average + threads > cores): oversubscribed OpenMP threads make steps up to 10x slower and erratic.",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the UNet weights, adapters and inputs (default 0)."
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="After timing, print torch.profiler tables of one bare and one FunLoRA mixed-class training step and "
        "sampling forward (first function of --functions) for every size.",
    )
    parser.add_argument(
        "--profile_rows", type=int, default=20, help="Number of ops in each --profile table (default 20)."
    )
    # Earlier spellings, kept working.
    parser.add_argument("--threads", dest="num_threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--many-classes", dest="many_classes", choices=["auto", "all", "small", "none"], help=argparse.SUPPRESS
    )
    parser.add_argument("--merged-tolerance", dest="merged_tolerance", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--profile-rows", dest="profile_rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=None, help="Also write the results as JSON to this file.")
    parser.add_argument(
        "--classes", type=int, default=NUM_MIXED_CLASSES, help="Classes in the mixed batches (even; default 10)."
    )
    parser.add_argument(
        "--precision",
        dest="precisions",
        choices=["fp32", "bf16", "both"],
        default="fp32",
        help="Time the fp32 steps, the bf16-autocast ones, or both (default fp32).",
    )
    parser.add_argument(
        "--compile",
        nargs="*",
        choices=list(FAMILIES),
        default=None,
        metavar="FAMILY",
        help="Also time torch.compile(model) (inductor) for training and sampling: of the named families, or of "
        "every family of --functions when none is named (each compilation takes a minute or more).",
    )
    parser.add_argument(
        "--lora_peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Time PEFT's LoRA (one rank-1 adapter per class) on the mixed sampling batch.",
    )
    parser.add_argument(
        "--op_counts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Count the aten ops of a step (16x16 UNet, batch 80) for 1, 2, 10 and 20 classes.",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 1:
        parser.error(f"--warmup must be >= 1 (the first warm-up round measures memory), got {args.warmup}")
    if args.sizes is None:
        args.sizes = ["16x16"] if args.quick else ["16x16", "32x32"]
    if args.classes < 2 or args.classes % 2:
        parser.error(f"--classes must be an even number >= 2 (two adapters of classes / 2), got {args.classes}")
    if args.compile and not set(args.compile) <= set(args.functions):
        parser.error(
            f"--compile {' '.join(args.compile)} names families that --functions {' '.join(args.functions)} does not "
            "benchmark; compile only benchmarked families (or pass --compile alone for all of them)"
        )
    args.precisions = ["fp32", "bf16"] if args.precisions == "both" else [args.precisions]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was given but torch.cuda.is_available() is False")
    return args


def main(args: argparse.Namespace) -> BenchmarkReport:
    """Run the benchmark, print the markdown tables and optionally write the JSON report."""
    start = time.perf_counter()
    device = torch.device(args.device)
    notes: list[str] = []
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    elif device.type == "cpu" and machine_is_busy(torch.get_num_threads()):
        notes.append(
            f"The machine was busy at start (1-minute load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
            f"cores), so the benchmark runs with 1 torch thread instead of {torch.get_num_threads()}: when other "
            "processes hold the cores, OpenMP threads wait for each other at every parallel region and steps run up "
            "to 10x slower and erratically, the many small per-class ops most. Pass --num_threads N to override."
        )
        torch.set_num_threads(1)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)

    many = args.many_classes
    if many == "auto":
        many = "all" if device.type == "cuda" else "small"
    machine = machine_info(device)
    if (
        device.type == "cpu"
        and args.num_threads is not None
        and args.num_threads > 1
        and machine_is_busy(args.num_threads)
    ):
        notes.append(
            f"The machine was busy at start (1-minute load average {machine.load_average:.1f} on "
            f"{machine.cpu_count} cores) and torch uses {args.num_threads} threads: when other processes hold the "
            "cores, OpenMP threads wait for each other at every parallel region, and steps can run up to 10x slower "
            "and erratically. --num_threads 1 gives stable ratios on a shared machine."
        )
    if many == "small" and "32x32" in args.sizes:
        notes.append(
            "The 1,000-class (100-adapter) step runs on the 16x16 UNet only (--many_classes small); pass "
            "--many_classes all to run it on the 32x32 UNet too."
        )
    report = BenchmarkReport(
        machine=machine,
        settings={
            "quick": args.quick,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "sizes": args.sizes,
            "functions": args.functions,
            "many_classes": many,
            "merged_tolerance": args.merged_tolerance,
            "classes": args.classes,
            "precisions": args.precisions,
            "compile": args.compile,
            "seed": args.seed,
            "command": " ".join(sys.argv),
        },
        memory_method=memory_method(device),
        models=[],
        comparisons=[],
        measurements={},
        notes=notes,
    )
    for size in args.sizes:
        run_many = many == "all" or (many == "small" and size == "16x16")
        info, measurements, rows, profiles = benchmark_size(
            UNET_SPECS[size], args.functions, run_many, args, device, notes, log
        )
        report.models.append(info)
        report.measurements[size] = measurements
        report.comparisons += rows
        report.profiles.update(profiles)
    if args.op_counts:
        log("counting the aten ops of a step ...")
        report.op_counts = op_counts(args.functions, args.seed, device)
    report.total_seconds = time.perf_counter() - start
    report.process_peak_rss_mib = process_peak_rss_mib()
    print(format_report(report))
    if args.output is not None:
        data = asdict(report)
        data["measurements"] = {
            size: {key: {**asdict(m), "median_s": m.median_s} for key, m in ms.items()}
            for size, ms in report.measurements.items()
        }
        args.output.write_text(json.dumps(data, indent=2))
        log(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main(parse_args())
