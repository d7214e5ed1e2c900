"""examples/protocol_speed.py: the steps per second of a recipe's tasks, read from train.py's TensorBoard losses."""

from __future__ import annotations

import json

import pytest
from conftest import load_example


@pytest.fixture(scope="module")
def speed_module():
    return load_example("protocol_speed")


def test_steps_per_second_come_from_the_logged_wall_times(speed_module, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "logs" / "funlora"))
    # Steps 1-4 a second apart, then steps 5-8 a quarter of a second apart.
    walltimes = {1: 100.0, 2: 101.0, 3: 102.0, 4: 103.0, 5: 103.25, 6: 103.5, 7: 103.75, 8: 104.0}
    for step, walltime in walltimes.items():
        writer.add_scalar("loss", 1.0 / step, global_step=step, walltime=walltime)
        writer.add_scalar("lr", 0.1, global_step=step, walltime=walltime + 100)  # another tag: not read
    writer.close()
    times = speed_module.logged_step_times(tmp_path / "logs")
    assert times == walltimes
    assert speed_module.steps_per_second(times, 1, 4) == pytest.approx(1.0, rel=1e-6)
    assert speed_module.steps_per_second(times, 4, 8) == pytest.approx(4.0, rel=1e-6)
    with pytest.raises(RuntimeError, match=r"steps \[9\] were not logged"):
        speed_module.steps_per_second(times, 4, 9)


def test_every_recipe_says_what_its_dataset_holds(speed_module):
    protocol_args = load_example("protocol_args")
    assert set(protocol_args.RECIPE_DATASETS) == set(protocol_args.RECIPES)
    for name, dataset in protocol_args.RECIPE_DATASETS.items():
        assert dataset["classes"] % protocol_args.RECIPES[name]["classes_per_task"] == 0  # whole tasks
        assert dataset["channels"] in (1, 3)


@pytest.mark.slow
def test_cifar100_recipe_speed_on_a_tiny_unet_projects_the_recipe_budget(speed_module, tmp_path):
    args, train_flags = speed_module.parse_args(
        ["--output_dir", str(tmp_path), "--steps", "2", "--warmup_steps", "1", "--images_per_class", "2"]
        + ["--output", str(tmp_path / "speed.json"), "--", "--resolution", "8", "--block_out_channels", "16,16,16,16"]
        + ["--layers_per_block", "1", "--norm_num_groups", "8", "--attention_head_dim", "8"]
        + ["--train_batch_size", "4", "--classes_per_task", "2", "--num_threads", "1"]
    )
    result = speed_module.main(args, train_flags)
    # Two tasks of the 2 x 2 synthetic classes, each 1 + 2 steps; the recipe's own budget in the projection.
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [f"class_{i:03d}" for i in range(4)]
    assert result["recipe_steps"] == {"first_task_steps": 30000, "task_steps": 10000} and result["num_tasks"] == 5
    assert result["task0_steps_per_second"] > 0 and result["task1_steps_per_second"] > 0
    expected = 30000 / result["task0_steps_per_second"] + 4 * 10000 / result["task1_steps_per_second"]
    assert result["projected_training_hours"] == pytest.approx(expected / 3600, rel=1e-9)
    assert json.loads((tmp_path / "speed.json").read_text()) == result
    index = json.loads((tmp_path / "run" / "funlora.json").read_text())
    assert [task["class_ids"] for task in index["tasks"]] == [[0, 1], [2, 3]]
