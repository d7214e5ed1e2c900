"""Shared fixtures: tiny UNet2DModels and seeded inputs.

The Hub is never reached from the tests: the variables below are set before huggingface_hub is imported.
"""

import importlib
import os
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

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402

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
