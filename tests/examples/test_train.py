"""examples/train.py: end to end through `accelerate launch`, data parallel, exact resume, and refused bad input.

The runs use a tiny UNet (8x8 digits, 2 levels) on 2 tasks of 2 classes ("--class_order 0,1,2,3") for a few steps;
what is checked is the plumbing (files, metrics, resume, errors), not the quality of the samples.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from conftest import EXAMPLES, ROOT, TINY_TRAIN_ARGS, UNET_CONFIGS, load_example, load_pipeline, sample_images
from fake_hub import FakeHub
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from funlora_peft.continual.checkpoint import list_checkpoints
from funlora_peft.pipeline import FunLoRAPipeline

TRAIN_SCRIPT = EXAMPLES / "train.py"


def launch(output_dir, *extra, launcher=("--num_processes", "1", "--cpu"), timeout=600):
    """Run `accelerate launch [launcher] examples/train.py TINY_TRAIN_ARGS --output_dir output_dir extra`."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1", *launcher]
    command += [str(TRAIN_SCRIPT), *TINY_TRAIN_ARGS, "--output_dir", str(output_dir), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def check_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`: equal digests mean nothing was written or deleted."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's backbone and adapters, keyed by file and tensor name."""
    tensors = {}
    for file in sorted(folder.glob("*/*.safetensors")):
        if file.parent.name.startswith("checkpoint-"):
            continue
        for key, value in load_file(file).items():
            tensors[f"{file.parent.name}/{key}"] = value
    return tensors


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted tiny run, shared by the tests that read it."""
    output_dir = tmp_path_factory.mktemp("train") / "run"
    result = launch(output_dir, "--use_ema", "--scheduler_shift", "2")
    check_ok(result)
    return SimpleNamespace(output_dir=output_dir, result=result)


def load_train_module():
    return load_example("train")


# ---------------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_end_to_end_run_folder_metrics_and_pipeline(tiny_run):
    out = tiny_run.output_dir
    for relpath in [
        "funlora.json",
        "metrics.json",
        "backbone/config.json",
        "backbone/diffusion_pytorch_model.safetensors",
        "task_0/adapter_config.json",
        "task_0/adapter_model.safetensors",
        "task_1/adapter_config.json",
        "task_1/adapter_model.safetensors",
        "samples/after_task_0.png",
        "samples/after_task_1.png",
        "scheduler/scheduler_config.json",
    ]:
        assert (out / relpath).is_file(), relpath
    card = (out / "README.md").read_text()  # our model card, not PEFT's
    assert "library_name: funlora-peft" in card and "task_1" in card
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard logs"
    # Folders moved into place from temporary ones get the permissions of a plain mkdir.
    assert {(out / name).stat().st_mode & 0o777 for name in ("backbone", "task_0", "samples", "checkpoint-3")} == {
        (out / "samples").stat().st_mode & 0o777
    }
    # Only safetensors, json, png and tensorboard files outside the checkpoints: nothing pickled.
    for path in out.rglob("*"):
        top = path.relative_to(out).parts[0]
        if path.is_file() and not top.startswith("checkpoint-"):
            tensorboard = top == "logs" and ("tfevents" in path.name or path.name == "hparams.yml")
            card = path == out / "README.md"
            assert path.suffix in (".safetensors", ".json", ".png") or tensorboard or card, path
    assert [step for step, _ in list_checkpoints(out)] == [3, 4, 6, 9, 10]
    # Task 0's checkpoints hold the backbone; task 1's optimizer holds task 1's adapter tensors and nothing else.
    assert (out / "checkpoint-3" / "backbone.safetensors").is_file()
    assert not (out / "checkpoint-6" / "backbone.safetensors").exists()
    # Checkpoints hold safetensors and JSON only: nothing to unpickle on resume.
    for checkpoint in out.glob("checkpoint-*"):
        assert {p.suffix for p in checkpoint.iterdir()} <= {".safetensors", ".json"}, sorted(checkpoint.iterdir())
    optimizer = json.loads((out / "checkpoint-6" / "optimizer.json").read_text())
    moments = load_file(out / "checkpoint-6" / "optimizer.safetensors")
    adapter = load_file(out / "checkpoint-6" / "adapter_model.safetensors")
    assert [len(group["params"]) for group in optimizer["param_groups"]] == [len(adapter)]
    assert sum(t.numel() for k, t in moments.items() if k.endswith(".exp_avg")) == sum(
        t.numel() for t in adapter.values()
    )
    assert json.loads((out / "checkpoint-6" / "scheduler.json").read_text())["last_epoch"] == 2

    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["real_data_accuracy"] <= 1.0
    assert [row["task"] for row in metrics["tasks"]] == [0, 1]
    assert [row["class_ids"] for row in metrics["tasks"]] == [[0, 1], [2, 3]]
    for k, row in enumerate(metrics["tasks"]):
        assert 0.0 <= row["cas"] <= 1.0
        assert len(row["accuracy_per_task"]) == k + 1
        assert row["fd"] >= 0.0
        assert row["train_seconds"] > 0.0
        assert isinstance(row["extra_parameters_per_class"], int) and row["extra_parameters_per_class"] > 0
    assert metrics["accuracy_matrix"] == [row["accuracy_per_task"] for row in metrics["tasks"]]
    # No forgetting by construction: task 0's samples after task 1 are bit-identical to those after task 0.
    first, last = metrics["tasks"]
    assert last["old_samples_identical"] is True
    assert all(last["samples_sha256"][c] == h for c, h in first["samples_sha256"].items())
    assert last["accuracy_per_task"][0] == first["accuracy_per_task"][0]
    assert metrics["forgetting"] == 0.0
    # The adapter of task 1 is ~ (out + in + 2p) per conv per class; task 0 also trained the backbone.
    assert first["trainable_parameters"] > last["trainable_parameters"] == 2 * last["extra_parameters_per_class"]

    from PIL import Image

    grid_0, grid_1 = (Image.open(out / f"samples/after_task_{k}.png") for k in (0, 1))
    assert grid_0.width == grid_1.width and grid_1.height > grid_0.height  # 2 rows, then 4 rows

    pipe = FunLoRAPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.class_ids == [0, 1, 2, 3]
    # The folder keeps the sampler its evaluation used (--scheduler_shift), so its pipeline draws the same samples.
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 2.0
    images = pipe(
        class_labels=[0, 1, 2, 3], num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt"
    ).images
    assert images.shape == (4, 1, 8, 8)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


@pytest.mark.slow
def test_multi_process_data_parallel(tmp_path):
    # Two processes with gloo on a CPU-only machine (DistributedType.MULTI_CPU), or two GPUs where there are.
    out = tmp_path / "ddp"
    result = launch(
        out,
        "--first_task_steps",
        "2",
        "--task_steps",
        "2",
        "--train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
        "--mixed_precision",
        "bf16",
        "--report_to",
        "none",
        launcher=("--multi_gpu", "--num_processes", "2"),
    )
    check_ok(result)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["task"] for row in metrics["tasks"]] == [0, 1]
    assert metrics["tasks"][1]["old_samples_identical"] is True
    pipe = FunLoRAPipeline.from_pretrained(out)
    assert pipe.class_ids == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.slow
def test_resume_in_the_middle_of_a_task_gives_the_uninterrupted_adapters(tiny_run, tmp_path):
    out = tmp_path / "resumed"
    # Stopped after global step 8 (task 1, step 4); the last checkpoint is checkpoint-6 (task 1, step 2).
    check_ok(launch(out, "--use_ema", "--scheduler_shift", "2", "--interrupt_after_steps", "8"))
    assert [step for step, _ in list_checkpoints(out)] == [3, 4, 6]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["task"] for row in metrics["tasks"]] == [0]
    assert not (out / "task_1").exists()
    # The checkpoint records the CPU thread count it trained with; say it was 3, as if written on another machine.
    state_file = out / "checkpoint-6" / "training_state.json"
    state = json.loads(state_file.read_text())
    assert state["cpu_threads"] == 1
    state_file.write_text(json.dumps({**state, "cpu_threads": 3}))

    result = launch(out, "--use_ema", "--scheduler_shift", "2", "--resume_from_checkpoint", "latest")
    check_ok(result)
    # Resuming with another count is allowed, with a warning naming the flag that would make it bit-exact.
    assert "trained with 3 CPU thread(s) and this one has 1" in result.stderr and "--num_threads 3" in result.stderr
    resumed, uninterrupted = run_tensors(out), run_tensors(tiny_run.output_dir)
    assert sorted(resumed) == sorted(uninterrupted)
    assert any(key.startswith("task_1/") for key in resumed)
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    final = json.loads((out / "metrics.json").read_text())
    reference = json.loads((tiny_run.output_dir / "metrics.json").read_text())
    for row, ref in zip(final["tasks"], reference["tasks"]):
        for name in ("cas", "accuracy_per_task", "fd", "samples_sha256"):
            assert row[name] == ref[name], name


@pytest.mark.slow
def test_resume_after_a_kill_while_a_task_was_written(tiny_run, tmp_path):
    # Killed after task 0's last checkpoint but before its outputs were complete: resuming from that checkpoint
    # writes them again and goes on to the same end.
    out = tmp_path / "killed"
    shutil.copytree(tiny_run.output_dir, out)
    for name in ("task_0", "task_1", "backbone", "funlora.json", "metrics.json"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    check_ok(launch(out, "--use_ema", "--scheduler_shift", "2", "--resume_from_checkpoint", "checkpoint-4"))
    resumed, uninterrupted = run_tensors(out), run_tensors(tiny_run.output_dir)
    assert sorted(resumed) == sorted(uninterrupted)
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any training step, nothing written


@pytest.fixture(scope="module")
def train_module():
    return load_train_module()


def run_main(train_module, *argv):
    """`main(parse_args(argv))` in this process; returns the SystemExit message."""
    args = train_module.parse_args([*TINY_TRAIN_ARGS, "--report_to", "none", *argv])
    with pytest.raises(SystemExit) as info:
        train_module.main(args)
    return str(info.value.code)


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    for class_name in ("cat", "dog"):
        (root / class_name).mkdir()
        for i in range(3):
            Image.new("L", (8, 8), color=40 * i + (100 if class_name == "dog" else 0)).save(
                root / class_name / f"{i}.png"
            )
    return root


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset_name", "no-such-user/no-such-dataset"], "could not be found"),
        (["--class_order", "0,1,42"], r"class_order names class ids \[42\]"),
        (["--class_order", "sorted", "--classes_per_task", "3"], "does not divide the 10 classes"),
        (["--block_out_channels", "16,30"], "do not divide by norm_num_groups"),
        (["--function", "sine"], "Unknown `function`"),
        (["--resume_from_checkpoint", "checkpoint-99"], "--resume_from_checkpoint: 'checkpoint-99' is no checkpoint"),
        (["--select_layers", "top=3"], r"--select_layers: layer selection 'top=3' must be top_k=K .* fraction=F"),
        (["--select_layers", "fraction=1.5"], r"--select_layers: layer selection 'fraction=1.5' must be"),
        (["--importance_probe_steps", "0"], r"--importance_probe_steps=0 must be >= 1"),
        (["--scheduler_shift", "0"], r"--scheduler_shift must be a number > 0 \(1: no shift\), got 0.0"),
    ],
    ids=[
        "unknown-dataset",
        "class-order",
        "layout",
        "unet-width",
        "function",
        "missing-checkpoint",
        "select-layers",
        "select-fraction",
        "probe-steps",
        "scheduler-shift",
    ],
)
def test_bad_input_is_refused_before_anything_is_written(train_module, tmp_path, argv, message):
    out = tmp_path / "out"
    error = run_main(train_module, "--output_dir", str(out), *argv)
    assert error.startswith("train.py: error:")
    assert __import__("re").search(message, error), error
    assert not out.exists()


def test_unknown_column_is_refused(train_module, tmp_path, imagefolder):
    out = tmp_path / "out"
    error = run_main(
        train_module, "--output_dir", str(out), "--dataset_name", str(imagefolder), "--label_column", "species"
    )
    assert "species" in error and "label" in error, error
    assert not out.exists()


@pytest.mark.slow
def test_corrupt_foreign_or_clobbering_runs_are_refused(train_module, tiny_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run.output_dir, out)
    before = tree_digest(out)

    # A fresh run into a folder holding a run.
    error = run_main(train_module, "--output_dir", str(out))
    assert "holds a previous run" in error and "--resume_from_checkpoint latest" in error
    # A checkpoint of another run (other seed).
    error = run_main(
        train_module, "--output_dir", str(out), "--use_ema", "--resume_from_checkpoint", "latest", "--seed", "1"
    )
    assert "belongs to a different run" in error and "seed" in error
    # A folder that is no checkpoint.
    error = run_main(train_module, "--output_dir", str(out), "--resume_from_checkpoint", str(out / "task_0"))
    assert "is not a training checkpoint" in error
    assert tree_digest(out) == before

    # A corrupted checkpoint: one flipped byte in the adapter tensors.
    adapter = out / "checkpoint-6" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF
    adapter.write_bytes(bytes(data))
    before = tree_digest(out)
    error = run_main(train_module, "--output_dir", str(out), "--use_ema", "--resume_from_checkpoint", "checkpoint-6")
    assert "adapter_model.safetensors does not match the sha256" in error
    # A finished task's adapter corrupted after the fact: resuming after it is refused too.
    weights = out / "task_0" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    before = tree_digest(out)
    error = run_main(train_module, "--output_dir", str(out), "--use_ema", "--resume_from_checkpoint", "checkpoint-9")
    assert "sha256" in error and "task_0" in error
    assert tree_digest(out) == before


@pytest.mark.slow
def test_cli_error_exit(tmp_path):
    out = tmp_path / "out"
    result = launch(out, "--classes_per_task", "3", "--class_order", "sorted")
    assert result.returncode != 0
    assert "train.py: error: classes_per_task=3 does not divide the 10 classes" in result.stderr
    assert f'File "{TRAIN_SCRIPT}"' not in result.stderr  # one line, no traceback through the script
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# --push_to_hub and --select_layers


@pytest.fixture(scope="module")
def pushed_training_run(tmp_path_factory):
    """`examples/train.py --push_to_hub` (tiny, 2 tasks, --select_layers top_k=3), run in this process with the fake
    Hub standing in for `huggingface_hub.HfApi`; built once for the tests below."""
    train = load_example("train")
    root = tmp_path_factory.mktemp("train-push")
    fake = FakeHub(root / "cache")
    tokens = []

    def hf_api(token=None, **kwargs):
        tokens.append(token)
        return fake

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub, "HfApi", hf_api)
        argv = [*TINY_TRAIN_ARGS, "--report_to", "none", "--output_dir", str(root / "run")]
        argv += ["--select_layers", "top_k=3"]
        argv += ["--push_to_hub", "--hub_model_id", "someone/trained", "--hub_token", "hf_fake", "--hub_private_repo"]
        train.main(train.parse_args(argv))
    return SimpleNamespace(hub=fake, folder=root / "run", tokens=tokens)


def test_train_script_pushes_one_commit_per_task_from_the_run_folder(pushed_training_run):
    hub, folder = pushed_training_run.hub, pushed_training_run.folder
    assert pushed_training_run.tokens == ["hf_fake", "hf_fake"] and hub.repos["someone/trained"]["private"] is True
    assert [c.commit_message for c in hub.commits] == [
        "Upload task_0 (classes [0, 1]) and backbone",
        "Upload task_1 (classes [2, 3])",
    ]
    assert [any(p.startswith("backbone/") for p in ops) for ops in hub.operations] == [True, False]
    # the layer selection travels with the tasks it concerns
    assert "importance.json" not in hub.operations[0] and {"importance.json", "importance.png"} <= set(
        hub.operations[1]
    )
    final = hub.tree("someone/trained")
    for path, data in final.items():
        if path not in ("README.md", "funlora.json"):
            assert data == (folder / path).read_bytes(), path
    assert json.loads(final["funlora.json"]) == json.loads((folder / "funlora.json").read_text())
    card = ModelCard(final["README.md"].decode())
    assert card.data.library_name == "funlora-peft"
    assert "## Layer importance" in card.text and "![layer importance](importance.png)" in card.text
    assert "| `task_1` |" in card.text and "![samples](samples/after_task_1.png)" in card.text


def test_train_script_push_loads_back_from_the_hub_with_the_same_samples(pushed_training_run, monkeypatch):
    hub = pushed_training_run.hub
    hub.install(monkeypatch)
    pipe = load_pipeline("someone/trained", tasks=["task_1"], cache_dir=hub.cache_dir)
    assert pipe.class_ids == [2, 3]
    assert not any(path.startswith("task_0/") for path in hub.requested_files())
    local = load_pipeline(pushed_training_run.folder)
    assert torch.equal(sample_images(pipe, [3, 2, 3]), sample_images(local, [3, 2, 3]))


def test_train_script_select_layers_adapts_only_the_chosen_convs_after_task_0(pushed_training_run):
    folder = pushed_training_run.folder
    importance = json.loads((folder / "importance.json").read_text())
    assert importance["source"] == "probe" and importance["select_layers"] == "top_k=3"
    scores, selected = importance["scores"], importance["selected"]
    assert len(selected) == 3 and len(scores) > 10
    assert selected == [n for n in scores if n in selected]  # U-Net order
    assert min(abs(scores[n]) for n in selected) >= max(abs(v) for n, v in scores.items() if n not in selected)
    from safetensors.torch import load_file

    def adapted(task):
        keys = load_file(folder / task / "adapter_model.safetensors")
        return {k.split(".funlora_")[0].removeprefix("base_model.model.") for k in keys}

    assert adapted("task_1") == set(selected)
    assert adapted("task_0") == set(scores)  # task 0 adapts every conv
    assert json.loads((folder / "task_1" / "adapter_config.json").read_text())["target_modules"] == selected
    metrics = json.loads((folder / "metrics.json").read_text())
    per_class = [row["extra_parameters_per_class"] for row in metrics["tasks"]]
    assert per_class[1] < per_class[0] / 5
    assert (folder / "importance.png").stat().st_size > 5000


def test_train_script_resumes_a_selected_run_with_the_same_selection(pushed_training_run, tmp_path):
    train = load_example("train")
    out = tmp_path / "run"
    argv = [*TINY_TRAIN_ARGS, "--report_to", "none", "--output_dir", str(out), "--select_layers", "top_k=3"]
    train.main(train.parse_args([*argv, "--interrupt_after_steps", "8"]))  # stopped in task 1 (checkpoint-6)
    assert (out / "importance.json").is_file() and not (out / "task_1").exists()
    saved = (out / "importance.json").read_bytes()
    moved = tmp_path / "importance.json"
    (out / "importance.json").rename(moved)
    with pytest.raises(SystemExit, match=r"importance.json is missing: the layers of tasks 1, 2, \.\.\. were chosen"):
        train.main(train.parse_args([*argv, "--resume_from_checkpoint", "latest"]))
    moved.rename(out / "importance.json")
    train.main(train.parse_args([*argv, "--resume_from_checkpoint", "latest"]))
    assert (out / "importance.json").read_bytes() == saved
    from safetensors.torch import load_file

    for task in ("task_0", "task_1"):
        resumed = load_file(out / task / "adapter_model.safetensors")
        reference = load_file(pushed_training_run.folder / task / "adapter_model.safetensors")
        assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_recipe_sets_its_flags_and_explicit_flags_win(train_module):
    recipe = load_example("protocol_args").RECIPES["fashion-mnist"]
    args = train_module.parse_args(["--recipe", "fashion-mnist"])
    assert {name: getattr(args, name) for name in recipe} == recipe
    assert args.dataset_name == "/usr/share/datasets/fashion-mnist" and args.resolution == 28
    # Flags given on the command line win, before or after --recipe; flags the recipe does not name keep their default.
    args = train_module.parse_args(["--task_steps", "7", "--recipe", "fashion-mnist", "--dataset_name", "data/fm"])
    assert (args.task_steps, args.dataset_name, args.first_task_steps) == (7, "data/fm", recipe["first_task_steps"])
    assert args.seed == train_module.parse_args([]).seed
    # Without --recipe nothing of it applies.
    assert train_module.parse_args([]).resolution == 16


def test_recipe_leaves_the_parser_it_is_given_unchanged():
    protocol_args = load_example("protocol_args")
    parser = argparse.ArgumentParser()
    protocol_args.add_recipe_argument(parser)
    recipe = protocol_args.RECIPES["fashion-mnist"]
    parser.add_argument("--task_steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    assert protocol_args.parse_with_recipe(parser, ["--recipe", "fashion-mnist"]).task_steps == recipe["task_steps"]
    assert (
        protocol_args.parse_with_recipe(parser, ["--recipe", "fashion-mnist", "--quick"], {"task_steps": 9}).task_steps
        == 9
    )
    assert protocol_args.parse_with_recipe(parser, ["--quick", "--task_steps", "5"], {"task_steps": 9}).task_steps == 5
    # The recipe's settings never became the parser's defaults.
    assert parser.parse_args([]).task_steps == 3 and parser.get_default("task_steps") == 3


def test_recipe_without_the_dataset_says_how_to_install_it(train_module, tmp_path, monkeypatch):
    # A machine without the Debian package.
    monkeypatch.setattr(load_example("protocol_args"), "is_idx_directory", lambda directory: False)
    out = tmp_path / "out"
    args = train_module.parse_args(["--recipe", "fashion-mnist", "--output_dir", str(out), "--report_to", "none"])
    with pytest.raises(SystemExit) as info:
        train_module.main(args)
    assert "apt-get install dataset-fashion-mnist" in str(info.value.code) and not out.exists()


def test_cifar100_recipe_runs_a_few_steps_on_a_tiny_rgb_imagefolder(train_module, tmp_path):
    """The paper's CIFAR-100 flags, shrunk only in data, budget and UNet size (a config file with attention at two
    levels, which the UNet flags cannot express)."""
    from diffusers import UNet2DModel
    from PIL import Image

    data = tmp_path / "rgb"
    for class_name in ("apple", "bear", "bus", "cloud"):
        for i in range(4):
            (data / class_name).mkdir(parents=True, exist_ok=True)
            colour = (60 * i, 200 - 40 * i, 50 * len(class_name))
            Image.new("RGB", (8, 8), color=colour).save(data / class_name / f"{i}.png")
    unet_dir = tmp_path / "unet"
    attention_everywhere = dict(down_block_types=("AttnDownBlock2D",) * 2, up_block_types=("AttnUpBlock2D",) * 2)
    UNet2DModel(**{**UNET_CONFIGS["attn"], "in_channels": 3, "out_channels": 3, **attention_everywhere}).save_config(
        unet_dir
    )
    out = tmp_path / "out"
    argv = ["--recipe", "cifar100", "--dataset_name", str(data), "--image_column", "image", "--label_column", "label"]
    argv += ["--resolution", "8", "--classes_per_task", "2", "--model_config_name_or_path", str(unet_dir)]
    argv += ["--train_batch_size", "4", "--first_task_steps", "2", "--task_steps", "1", "--lr_warmup_steps", "1"]
    argv += ["--task_lr_warmup_steps", "0", "--eval_samples_per_class", "2", "--classifier_steps", "2"]
    argv += ["--cas_steps_per_class", "1", "--grid_samples_per_class", "1", "--num_inference_steps", "2"]
    argv += ["--output_dir", str(out), "--report_to", "none", "--num_threads", "1"]
    args = train_module.parse_args(argv)
    # What the recipe sets and this command does not: EMA, the adapters' settings, the sampler; bf16 only on CUDA.
    assert args.use_ema and args.ema_max_decay == 0.9999 and args.init_omega == 0.3 and args.num_functions == 10
    assert args.mixed_precision == ("bf16" if torch.cuda.is_available() else None)
    train_module.main(args)
    index = json.loads((out / "funlora.json").read_text())
    assert [task["class_ids"] for task in index["tasks"]] == [[0, 1], [2, 3]]
    saved = json.loads((out / "backbone" / "config.json").read_text())
    assert saved["down_block_types"] == ["AttnDownBlock2D", "AttnDownBlock2D"] and saved["in_channels"] == 3
    pipe = load_pipeline(out)
    assert sample_images(pipe, [0, 3]).shape == (2, 3, 8, 8)


def test_pretrained_backbone_starts_from_its_weights_and_a_class_embedding_unet_is_refused(train_module, tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(5)
    unet = UNet2DModel(**train_module.protocol_args.unet_config_from_args(train_module.parse_args([]), 1, 8))
    unet.save_pretrained(tmp_path / "pretrained")
    args = train_module.parse_args([*TINY_TRAIN_ARGS, "--pretrained_model_name_or_path", str(tmp_path / "pretrained")])
    config = train_module.protocol_args.unet_config_from_args(args, 1, 8)
    started = train_module.protocol_args.initial_unet(args, config, args.seed)
    assert all(torch.equal(a, b) for a, b in zip(started.state_dict().values(), unet.state_dict().values()))
    unet.save_config(tmp_path / "conditional")
    config_file = tmp_path / "conditional" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "num_class_embeds": 10}))
    out = tmp_path / "out"
    conditional = str(tmp_path / "conditional")
    error = run_main(train_module, "--output_dir", str(out), "--model_config_name_or_path", conditional)
    assert "is a class-embedding UNet" in error and "--model_config_name_or_path" in error and not out.exists()


def test_a_diverged_loss_stops_the_run_naming_the_rates_before_a_checkpoint_keeps_it(train_module, tmp_path):
    out = tmp_path / "out"
    error = run_main(train_module, "--output_dir", str(out), "--adapter_learning_rate", "1e30")
    found = re.fullmatch(
        r"train\.py: error: training diverged: the loss of task 0 is (nan|-?inf) at step (\d+) of the task, which "
        r"trains the backbone and adapter task_0: .* Lower --learning_rate \(now 0\.002\) or --adapter_learning_rate "
        r"\(now 1e\+30\) and train again into a new --output_dir \(or with --overwrite_output_dir\): .*\.",
        error,
    )
    assert found, error
    # No checkpoint holds the diverged step's weights (task 0: its step is the global step).
    kept = [int(path.name.split("-")[1]) for path in out.glob("checkpoint-*")] if out.exists() else []
    assert all(step < int(found.group(2)) for step in kept)
