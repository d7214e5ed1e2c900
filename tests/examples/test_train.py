"""examples/train.py: end to end through `accelerate launch`, data parallel, exact resume, and refused bad input.

The runs use a tiny UNet (8x8 digits, 2 levels) on 2 tasks of 2 classes ("--class_order 0,1,2,3") for a few steps;
what is checked is the plumbing (files, metrics, resume, errors), not the quality of the samples.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import load_example
from safetensors.torch import load_file

from funlora_peft.continual.checkpoint import (
    CheckpointError,
    TrainingState,
    list_checkpoints,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from funlora_peft.continual.training import step_generator
from funlora_peft.pipeline import FunLoRAPipeline, make_image_grid

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "examples" / "train.py"

TINY = [
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


def launch(output_dir, *extra, launcher=("--num_processes", "1", "--cpu"), timeout=600):
    """Run `accelerate launch [launcher] examples/train.py TINY --output_dir output_dir extra`."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1", *launcher]
    command += [str(TRAIN_SCRIPT), *TINY, "--output_dir", str(output_dir), *extra]
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
    result = launch(output_dir, "--use_ema")
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
    check_ok(launch(out, "--use_ema", "--interrupt_after_steps", "8"))
    assert [step for step, _ in list_checkpoints(out)] == [3, 4, 6]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["task"] for row in metrics["tasks"]] == [0]
    assert not (out / "task_1").exists()

    result = launch(out, "--use_ema", "--resume_from_checkpoint", "latest")
    check_ok(result)
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
    check_ok(launch(out, "--use_ema", "--resume_from_checkpoint", "checkpoint-4"))
    resumed, uninterrupted = run_tensors(out), run_tensors(tiny_run.output_dir)
    assert sorted(resumed) == sorted(uninterrupted)
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


def test_step_generator_depends_only_on_its_key():
    draw = lambda *key: torch.randn(4, generator=step_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 1, 2), draw(0, 1, 2))
    assert not torch.equal(draw(0, 1, 2), draw(0, 2, 1))
    assert not torch.equal(draw(0, 1, 2), draw(1, 1, 2))


class FakeCheckpointer:
    """Writes a few files like `Checkpointer.save_state`; `fail_after` simulates a kill in the middle of the save."""

    is_main_process = True

    def __init__(self, fail_after=None):
        self.fail_after = fail_after

    def save_state(self, folder):
        for i, name in enumerate(["adapter_model.safetensors", "optimizer.safetensors", "scheduler.json"]):
            if self.fail_after is not None and i >= self.fail_after:
                raise KeyboardInterrupt("killed while saving")
            Path(folder, name).write_bytes(os.urandom(64))


def test_checkpoints_are_atomic_and_checked(tmp_path):
    key = {"seed": 0, "tasks": [[0, 1], [2, 3]]}
    save_checkpoint(FakeCheckpointer(), tmp_path, TrainingState(task=0, task_step=3, global_step=3, run_key=key))
    with pytest.raises(KeyboardInterrupt):
        state = TrainingState(task=1, task_step=2, global_step=6, run_key=key)
        save_checkpoint(FakeCheckpointer(fail_after=2), tmp_path, state)
    # The kill left a hidden temporary folder, never a checkpoint-6 that would load wrong.
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3]
    latest = resolve_checkpoint(tmp_path, "latest")
    assert latest.name == "checkpoint-3"
    assert read_checkpoint(latest, key).global_step == 3

    with pytest.raises(CheckpointError, match="belongs to a different run.*seed: 0 in the checkpoint, 1 now"):
        read_checkpoint(latest, {**key, "seed": 1})
    optimizer = latest / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:-1] + b"x")
    with pytest.raises(CheckpointError, match="optimizer.safetensors does not match the sha256"):
        read_checkpoint(latest, key)
    (latest / "training_state.json").unlink()
    with pytest.raises(CheckpointError, match="is not a training checkpoint: it has no training_state.json"):
        read_checkpoint(latest, key)
    with pytest.raises(CheckpointError, match="is no checkpoint folder"):
        resolve_checkpoint(tmp_path, "checkpoint-99")

    # Pruning keeps the newest ones.
    for step in (9, 12):
        save_checkpoint(
            FakeCheckpointer(), tmp_path, TrainingState(task=1, task_step=step, global_step=step, run_key=key), 2
        )
    assert [step for step, _ in list_checkpoints(tmp_path)] == [9, 12]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_image_grid_has_one_row_per_class():
    images = torch.rand(3 * 4, 1, 8, 8)
    grid = make_image_grid(images, rows=3, padding=1, scale=2)
    assert grid.size == ((4 * 9 + 1) * 2, (3 * 9 + 1) * 2) and grid.mode == "L"
    assert make_image_grid(torch.rand(2, 3, 8, 8), rows=2).mode == "RGB"


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any training step, nothing written


@pytest.fixture(scope="module")
def train_module():
    return load_train_module()


def run_main(train_module, *argv):
    """`main(parse_args(argv))` in this process; returns the SystemExit message."""
    args = train_module.parse_args([*TINY, "--report_to", "none", *argv])
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
