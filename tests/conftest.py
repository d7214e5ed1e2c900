"""Shared fixtures: tiny UNet2DModels and seeded inputs, the run folder, the fake Hub, the example scripts.

The Hub is never reached from the tests: the variables below are set before huggingface_hub is imported, and the
`hub` fixture stands a fake Hub (`fake_hub.FakeHub`) in for it.
"""

import importlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_CACHE", os.path.join(tempfile.gettempdir(), "funlora-test-hf-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread, and idle OpenMP threads spin on a busy 2-core machine.
# Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import huggingface_hub  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402
from fake_hub import FakeHub  # noqa: E402
from peft import get_peft_model  # noqa: E402
from PIL import Image  # noqa: E402

from funlora_peft import FunLoRAConfig, FunLoRAPipeline, push_to_hub  # noqa: E402
from funlora_peft.run_folder import save_run  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# The example scripts import their shared flags (examples/protocol_args.py), as they do when run from the checkout.
sys.path.insert(0, str(EXAMPLES))


def load_example(name: str):
    """The example script `examples/<name>.py` as a module (e.g. `load_example("train").main(...)`)."""
    return importlib.import_module(name)


# Two tiny UNets: one with attention blocks, one without attention whose down path changes width (so its
# resnets carry a 1x1 `conv_shortcut`). Both have at least 16 channels in every conv but conv_in/conv_out.
UNET_CONFIGS = {
    "attn": dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    "shortcut": dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
}


def make_unet(name: str = "attn", seed: int = 0) -> UNet2DModel:
    """A freshly initialised tiny UNet2DModel, deterministic for a given seed."""
    torch.manual_seed(seed)
    return UNet2DModel(**UNET_CONFIGS[name]).eval()


def make_inputs(unet: UNet2DModel, batch_size: int = 4, seed: int = 1):
    """Seeded `(x_t, timestep)` for `unet`: `x_t` of shape (batch, channels, height, width), float timesteps."""
    generator = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x_t = torch.randn(batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=generator)
    timestep = torch.rand(batch_size, generator=generator) * 1000
    return x_t, timestep


@pytest.fixture(params=sorted(UNET_CONFIGS))
def unet_name(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------------------------------------------------------------
# The run folder


CLASS_NAMES = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four"}
TASKS = {"task_0": [0, 1], "task_1": [2, 3], "task_2": [4]}
# metrics.json of the run folder fixture (the rows a training run writes, with made-up values)
METRICS = {
    "real_data_accuracy": 0.97,
    "tasks": [
        {
            "task": k,
            "class_ids": ids,
            "seen_class_ids": [c for done in list(TASKS.values())[: k + 1] for c in done],
            "cas": 0.9 - 0.1 * k,
            "cas_per_task": [0.9] * (k + 1),
            "recognition": 0.95,
            "accuracy_per_task": [0.95] * (k + 1),
            "fd": 1.5 + k,
            "train_seconds": 12.0,
            "extra_parameters_per_class": 1234,
        }
        for k, ids in enumerate(TASKS.values())
    ],
}


def make_run(folder, function="cos"):
    """Save a run with `save_run`: a tiny backbone and three tasks with random (non-identity) adapters.

    Returns the PeftModel that was saved.
    """
    unet = make_unet("attn")
    model = None
    for name, class_ids in TASKS.items():
        config = FunLoRAConfig(class_ids=class_ids, function=function, init_seed=1)
        if model is None:
            model = get_peft_model(unet, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".funlora_alpha." in n:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    save_run(model, folder, class_names=CLASS_NAMES)
    return model


def load_pipeline(source, **kwargs) -> FunLoRAPipeline:
    """`FunLoRAPipeline.from_pretrained(source, **kwargs)` with its progress bar off."""
    pipe = FunLoRAPipeline.from_pretrained(source, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_images(pipe, labels, seed=0):
    """`(len(labels), channels, height, width)` samples in [0, 1], 3 Euler steps from noise seeded by `seed`."""
    return pipe(class_labels=labels, num_inference_steps=3, generator=torch.manual_seed(seed), output_type="pt").images


@pytest.fixture(scope="session")
def _run_template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run-template") / "run"
    make_run(folder)
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    (folder / "samples").mkdir()
    for k in range(3):
        Image.new("L", (8 * 4, 8 * (2 * k + 2)), color=40 * k).save(folder / "samples" / f"after_task_{k}.png")
    return folder


@pytest.fixture
def run_folder(tmp_path, _run_template):
    """A fresh copy of a complete 3-task run folder (`make_run`, plus `METRICS` and a sample grid after each task)."""
    folder = tmp_path / "run"
    shutil.copytree(_run_template, folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# The fake Hub

REPO = "someone/funlora-tiny"


@pytest.fixture
def hub(tmp_path, monkeypatch, run_folder):
    """A fake Hub holding `run_folder` pushed to REPO; downloads land in `hub.cache_dir`, not in the default cache."""
    fake = FakeHub(tmp_path / "cache")
    fake.install(monkeypatch)
    # cache_dir must be passed through: the default cache is empty and unrelated.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))
    fake.pushed = push_to_hub(run_folder, REPO, api=fake, license="apache-2.0", commit_message="FunLoRA")
    return fake


# ---------------------------------------------------------------------------------------------------------------------
# The training script with tiny settings: 8x8 digits, a 2-level UNet, 2 tasks of 2 classes, a few steps

TINY_TRAIN_ARGS = [
    "--resolution", "8",
    "--block_out_channels", "16,32",
    "--norm_num_groups", "8",
    "--class_order", "0,1,2,3",
    "--classes_per_task", "2",
    "--first_task_steps", "4",
    "--task_steps", "6",
    "--train_batch_size", "8",
    "--checkpointing_steps", "3",
    "--eval_samples_per_class", "4",
    "--grid_samples_per_class", "3",
    "--num_inference_steps", "2",
    "--classifier_epochs", "1",
    "--num_threads", "1",
]  # fmt: skip

# Global steps: task 0 is steps 1-4, task 1 steps 5-10; checkpoints at 3, 4 (end of task 0), 6, 9 and 10.
