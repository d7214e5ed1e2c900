"""The `funlora` command: `funlora sample` (grids from a run folder or the Hub) and `funlora download`."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, load_pipeline
from PIL import Image

from funlora_peft import cli
from funlora_peft.continual.evaluation import class_seed


def grid_size(rows: int, cols: int, side: int = 8, scale: int = 4) -> tuple[int, int]:
    """Size of a `make_image_grid` picture (1-pixel padding) of rows x cols images of side x side."""
    return ((cols * (side + 1) + 1) * scale, (rows * (side + 1) + 1) * scale)


# --------------------------------------------------------------------------------------------------------------------
# funlora sample
# --------------------------------------------------------------------------------------------------------------------


def sample(*argv):
    return cli.main(["sample", *argv])


def test_sample_writes_a_grid_from_a_run_folder(run_folder, tmp_path):
    out = tmp_path / "grids" / "grid.png"
    command = [sys.executable, "-m", "funlora_peft.cli", "sample", str(run_folder), "--classes", "0,3"]
    command += ["--num_samples", "3", "--num_inference_steps", "2", "--output", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "classes [0, 3], 3 samples each" in result.stdout
    with Image.open(out) as picture:
        assert picture.size == grid_size(rows=2, cols=3, scale=8) and picture.mode == "L"


def test_sample_rows_do_not_depend_on_the_other_classes(run_folder, tmp_path):
    both, alone = tmp_path / "both.png", tmp_path / "alone.png"
    sample(str(run_folder), "--classes", "0,3", "-n", "2", "--steps", "2", "--out", str(both), "--scale", "1")
    sample(str(run_folder), "--classes", "3", "--num_samples", "2", "--num_inference_steps", "2", "--output",
           str(alone), "--scale", "1")  # fmt: skip
    with Image.open(both) as a, Image.open(alone) as b:
        # class 3's row (the second) of the two-class grid equals the one-class grid
        assert a.crop((0, 9, a.width, a.height)).tobytes() == b.crop((0, 0, b.width, 10)).tobytes()


def test_sample_tasks_flag_samples_every_class_of_those_tasks(run_folder, tmp_path, capsys):
    out = tmp_path / "g.png"
    sample(str(run_folder), "--tasks", "task_1,task_2", "--num_samples", "2", "--num_inference_steps", "2",
           "--output", str(out), "--scale", "4")  # fmt: skip
    assert "classes [2, 3, 4]" in capsys.readouterr().out
    with Image.open(out) as picture:
        assert picture.size == grid_size(rows=3, cols=2)


def test_sample_from_the_hub_downloads_only_the_owning_tasks(hub, tmp_path):  # noqa: F811
    out = tmp_path / "hub.png"
    sample(REPO, "--classes", "4,1", "--num_samples", "2", "--num_inference_steps", "2",
           "--cache_dir", str(hub.cache_dir), "--output", str(out), "--scale", "4")  # fmt: skip
    with Image.open(out) as picture:
        assert picture.size == grid_size(rows=2, cols=2)
    fetched = {path.split("/")[0] for path in hub.requested_files()}
    assert {"task_0", "task_2"} <= fetched and "task_1" not in fetched


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--classes", "7"], r"--classes \[7\] belong to no task"),
        (["--tasks", "task_0", "--classes", "3"], r"class_labels \[3\] are not loaded"),
        (["--tasks", "task_9"], "task_9"),
        (["--output", "grid.jpg"], "--output must name a .png file"),
        (["--num_samples", "0"], "expected a positive integer, got 0"),
    ],
)
def test_sample_bad_input_exits_with_a_clear_message(run_folder, tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        sample(str(run_folder), "--output", str(tmp_path / "g.png"), *argv)
    text = str(raised.value.code) + capsys.readouterr().err
    assert re.search(message, text), text


# --------------------------------------------------------------------------------------------------------------------
# The commands of README.md and examples/README.md
# --------------------------------------------------------------------------------------------------------------------


def test_cli_sample_from_the_hub_loads_only_the_owning_tasks(hub, run_folder, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["sample", REPO, "--classes", "4,0", "--num_samples", "3", "--num_inference_steps", "2", "--seed", "5"]
    assert cli.main(argv + ["--scale", "1", "--output", str(out), "--cache_dir", str(hub.cache_dir)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: classes [4, 0], 3 samples each")
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 9 + 1, 3 * 9 + 1)  # one row per class, 3 columns, 1-pixel white padding
    requested = hub.requested_files()
    assert not any(path.startswith("task_1/") for path in requested)
    assert {p.split("/")[0] for p in requested if p.startswith("task_")} == {"task_0", "task_2"}
    # each row holds the pipeline's samples of that class, drawn with the class's own generator
    local = load_pipeline(run_folder)
    for row, class_id in enumerate([4, 0]):
        generator = torch.Generator().manual_seed(class_seed(5, class_id))
        images = local(class_labels=[class_id] * 3, num_inference_steps=2, generator=generator).images
        for column, image in enumerate(images):
            top, left = 1 + 9 * row, 1 + 9 * column
            np.testing.assert_array_equal(grid[top : top + 8, left : left + 8], np.asarray(image))
    # a run folder works the same way
    local_out = tmp_path / "local.png"
    argv[1] = str(run_folder)
    assert cli.main(argv + ["--scale", "1", "--output", str(local_out)]) == 0
    assert np.array_equal(np.asarray(Image.open(local_out)), grid)


def test_cli_download_fetches_only_the_named_tasks(hub, tmp_path, capsys):
    argv = ["download", REPO, "--tasks", "task_0,task_2", "--cache_dir", str(hub.cache_dir)]
    assert cli.main(argv + ["--revision", hub.pushed[-1].oid]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert sorted(p.name for p in folder.iterdir()) == ["backbone", "funlora.json", "task_0", "task_2"]
    assert not any(path.startswith("task_1/") for path in hub.requested_files())
    local_dir = tmp_path / "here"
    assert cli.main(argv + ["--local_dir", str(local_dir)]) == 0
    assert Path(capsys.readouterr().out.strip()) == local_dir.resolve()
    assert (local_dir / "task_2" / "adapter_model.safetensors").is_file() and not (local_dir / "task_1").exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["sample", "RUN", "--classes", "3,x", "--out", "g.png"], "argument --classes: expected comma-separated"),
        (
            ["sample", "RUN", "--classes", "9", "--out", "g.png"],
            r"--classes \[9\] belong to no task.*\[0, 1, 2, 3, 4\]",
        ),
        (["sample", "RUN", "--classes", "3", "--out", "g.jpg"], "--output must name a .png file"),
        (["sample", "RUN", "--classes", "3", "-n", "0", "--out", "g.png"], "argument -n: expected a positive integer"),
        (["sample", "RUN", "--classes", "3", "--tasks", "task_9", "--out", "g.png"], r"`tasks` names \['task_9'\]"),
        (["sample", "RUN", "--classes", "3"], "--output is required"),
        (["download", "someone/missing", "--tasks", "task_0"], "Could not get funlora.json of 'someone/missing'"),
        (["download", REPO, "--tasks", ","], "argument --tasks: expected comma-separated task names"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_bad_input_exits_with_a_clear_message(hub, run_folder, tmp_path, capsys, argv, match):
    argv = [str(run_folder) if a == "RUN" else str(tmp_path / a) if a.startswith("g.") else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--cache_dir", str(hub.cache_dir)] if argv[0] != "frobnicate" else argv)
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "g.png").exists()
