"""examples/layer_ablation.py: train.py once, then again from its task 0 with every conv set."""

import json
import os
import subprocess
import sys

import pytest

from funlora_peft.continual.importance import random_target_modules, select_target_modules


@pytest.mark.slow
def test_layer_ablation_script_compares_the_conv_sets(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    tiny = "--resolution 8 --block_out_channels 16,32 --class_order 0,1,2,3,4,5 --classes_per_task 2 "
    tiny += "--first_task_steps 4 --task_steps 5 --train_batch_size 8 --eval_samples_per_class 4 "
    tiny += "--num_inference_steps 2 --classifier_epochs 1 --importance_probe_steps 3"
    command = [sys.executable, str(root / "examples" / "layer_ablation.py"), "--output_dir", str(tmp_path / "out")]
    command += ["--ks", "2,3", "--seeds", "0,1", *tiny.split()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    scores = data["importance"]["scores"]
    runs = {(r["strategy"], r["k"], r["seed"]): r for r in data["runs"]}
    n = len(scores)
    expected = {("all", n, s) for s in (0, 1)} | {
        (st, k, s) for st in ("top", "bottom", "random") for k in (2, 3) for s in (0, 1)
    }
    assert set(runs) == expected
    for k in (2, 3):
        assert runs[("top", k, 0)]["layers"] == select_target_modules(scores, top_k=k)
        assert runs[("bottom", k, 1)]["layers"] == select_target_modules(scores, top_k=k, largest=False)
        assert runs[("random", k, 0)]["layers"] == random_target_modules(scores, k, seed=0)
        assert runs[("top", k, 0)]["extra_parameters_per_class"] < runs[("all", n, 0)]["extra_parameters_per_class"]
    assert all(0.0 <= r["cas"] <= 1.0 for r in runs.values())
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| top | 2 |" in report and f"| all | {n} |" in report and "least important" in report
    assert "| level | convs | among the 10 most important | among the 10 least important |" in report
    assert (tmp_path / "out" / "importance.png").stat().st_size > 5000
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "importance.png",
        "results.json",
        "results.md",
        "task0",
    ]
    bad = subprocess.run([*command[:2], "--strategies", "top,best"], cwd=root, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "--strategies='top,best': unknown ['best']" in bad.stderr
