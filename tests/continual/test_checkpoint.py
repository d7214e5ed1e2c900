"""Checkpoints: written atomically, refused when foreign, incomplete or corrupted, nothing pickled."""

import os
from pathlib import Path

import pytest

from funlora_peft.continual.checkpoint import (
    CheckpointError,
    TrainingState,
    list_checkpoints,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    thread_count_note,
)


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


def test_a_resume_with_another_cpu_thread_count_is_named(tmp_path):
    save_checkpoint(FakeCheckpointer(), tmp_path, TrainingState(task=0, task_step=3, global_step=3, cpu_threads=4))
    state = read_checkpoint(tmp_path / "checkpoint-3", {})
    assert state.cpu_threads == 4
    note = thread_count_note(state, "cpu", 2)
    assert "trained with 4 CPU thread(s) and this one has 2" in note and "--num_threads 4" in note
    assert thread_count_note(state, "cpu", 4) is None
    assert thread_count_note(state, "cuda", 2) is None  # the CPU's thread count does not decide a GPU's sums
    # A checkpoint written before the count was recorded reads as None and is not warned about.
    state_file = tmp_path / "checkpoint-3" / "training_state.json"
    state_file.write_text(state_file.read_text().replace('"cpu_threads": 4,', ""))
    old = read_checkpoint(tmp_path / "checkpoint-3", {})
    assert old.cpu_threads is None and thread_count_note(old, "cpu", 2) is None
