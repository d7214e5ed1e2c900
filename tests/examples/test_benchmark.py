"""examples/benchmark.py: every method end to end on a tiny configuration, and refused bad input.

The run uses an 8x8 digits UNet with 2 levels, 2 tasks of 2 classes, one seed and a few steps, in this process
(`--num_workers 0`); what is checked is the plumbing and the guarantees that hold at any budget (FunLoRA's and LoRA's
zero forgetting with bit-identical old samples, the equal step budget), not the quality of the samples.
"""

import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import load_example

ROOT = Path(__file__).resolve().parents[2]
BENCHMARK_SCRIPT = ROOT / "examples" / "benchmark.py"

TINY = [
    "--resolution", "8",
    "--block_out_channels", "16,32",
    "--norm_num_groups", "8",
    "--class_order", "0,1,2,3",
    "--classes_per_task", "2",
    "--first_task_steps", "4",
    "--task_steps", "3",
    "--train_batch_size", "8",
    "--lr_warmup_steps", "1",
    "--eval_samples_per_class", "4",
    "--num_inference_steps", "2",
    "--classifier_epochs", "1",
    "--replay_samples_per_class", "3",
    "--top_k", "5",
    "--seeds", "0",
    "--num_workers", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def benchmark():
    return load_example("benchmark")


@pytest.fixture(scope="module")
def tiny_run(benchmark, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("benchmark")
    results = benchmark.main(benchmark.parse_args([*TINY, "--output_dir", str(output_dir)]))
    return output_dir, results


def _expected_rows(benchmark) -> list[str]:
    args = benchmark.parse_args(TINY)
    methods, _ = benchmark.selected_methods(args)
    return [benchmark.row_name(method, args) for method in methods]


@pytest.mark.slow
def test_writes_every_file_and_every_row(benchmark, tiny_run):
    output_dir, results = tiny_run
    for name in ("results.md", "results.json", "accuracy_per_task.png"):
        assert (output_dir / name).stat().st_size > 0, name
    assert (output_dir / "accuracy_per_task.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (output_dir / "results.md").read_text()
    main_table = table.split("Rank of F_y")[0]
    rows = [line for line in main_table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    names = [row.split("|")[1].strip() for row in rows]
    expected = _expected_rows(benchmark)
    assert names == expected
    # Every method of the comparison is there, the top-k layer selection included.
    for name in (
        "joint training (upper bound)",
        "fine-tuning",
        "generative replay",
        "PEFT LoRA r=1",
        "PEFT LoRA r=4",
        "FunLoRA linear",
        "FunLoRA cos",
        "FunLoRA rshift",
        "FunLoRA power",
    ):
        assert name in names
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    for column in ("final CAS", "average incremental CAS", "forgetting", "FD", "extra parameters per class"):
        assert column in header
    assert all(row.count("|") == header.count("|") for row in rows)
    # The rank F_y reached: a table row per FunLoRA method; `linear` (p = 1) is rank 1 by construction.
    ranks = {
        run["name"]: run["rank_per_task"]
        for runs in results["runs"].values()
        for run in runs
        if "rank_per_task" in run
    }
    assert sorted(ranks) == sorted(name for name in expected if name.startswith("FunLoRA"))
    for name, per_task in ranks.items():
        assert [task["task"] for task in per_task] == [0, 1], name
        for task in per_task:
            for when in ("initial", "trained"):
                assert 1 <= task[when]["mean"] <= task[when]["max"] <= 32, (name, task)  # the widest conv: 32
    assert all(task["trained"]["max"] == 1 for task in ranks["FunLoRA linear"])
    rank_rows = [line for line in table.split("Rank of F_y")[1].splitlines() if line.startswith("| FunLoRA")]
    assert [row.split("|")[1].strip() for row in rank_rows] == list(ranks)
    on_disk = json.loads((output_dir / "results.json").read_text())
    assert sorted(on_disk["summaries"]) == sorted(expected)
    assert on_disk["task_layout"] == [[0, 1], [2, 3]] == results["task_layout"]


@pytest.mark.slow
def test_funlora_and_lora_never_forget(tiny_run):
    _, results = tiny_run
    for name, runs in results["runs"].items():
        if name.startswith(("FunLoRA", "PEFT LoRA")):
            (run,) = runs
            # Old classes' samples are bit-identical after every later task, so forgetting is exactly 0.
            assert run["old_samples_identical"] is True, name
            assert run["forgetting"] == 0.0, name
            assert run["accuracy_matrix"][0][0] == run["accuracy_matrix"][1][0], name
            assert results["summaries"][name]["forgetting"] == {"mean": 0.0, "std": 0.0}


@pytest.mark.slow
def test_class_embedding_baselines_change_old_samples(tiny_run):
    _, results = tiny_run
    # Fine-tuning and replay update every weight: an old class's samples cannot stay bit-identical.
    for name in ("fine-tuning", "generative replay"):
        (run,) = results["runs"][name]
        assert run["old_samples_identical"] is False
        assert run["forgetting"] is not None and math.isfinite(run["forgetting"])
    (joint,) = results["runs"]["joint training (upper bound)"]
    assert joint["forgetting"] is None and len(joint["stages"]) == 1 and joint["stages"][0]["task"] == 1


@pytest.mark.slow
def test_equal_budget_and_costs(tiny_run):
    _, results = tiny_run
    runs = [run for method_runs in results["runs"].values() for run in method_runs]
    assert {run["train_steps"] for run in runs} == {4 + 3}
    assert {run["nfe"] for run in runs} == {2}
    for run in runs:
        assert 0.0 <= run["final_cas"] <= 1.0
        assert run["train_seconds"] > 0 and run["sampling_seconds"] > 0 and run["peak_memory_mb"] > 0
    (replay,) = results["runs"]["generative replay"]
    assert 0 < replay["generation_seconds"] < replay["train_seconds"]
    per_class = {name: runs[0]["extra_parameters_per_class"] for name, runs in results["runs"].items()}
    assert per_class["fine-tuning"] == 4 * 16  # time_embed_dim = 4 * block_out_channels[0]
    assert per_class["FunLoRA linear"] < per_class["FunLoRA cos"] < per_class["PEFT LoRA r=1"]
    assert per_class["PEFT LoRA r=1"] < per_class["PEFT LoRA r=4"]
    top = [name for name in per_class if "top-" in name]
    for name in top:
        # Tasks >= 1 adapt only the top-k convs: fewer parameters per new class than on every conv.
        assert per_class[name] < per_class["FunLoRA cos"]
        assert len(results["runs"][name][0]["target_modules_after_task_0"]) == 5


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--methods", "funlora-cos,dgr"], r"--methods='funlora-cos,dgr': unknown method\(s\) \['dgr'\]; pass 'all'"),
        (["--seeds", "0,x"], r"--seeds='0,x' must be a comma-separated list of integers, e.g. 0,1,2"),
        (["--seeds", "1,1"], r"--seeds='1,1' must list distinct non-negative integers"),
        (["--task_steps", "0"], r"--task_steps=0 must be >= 1"),
        (["--num_workers", "-1"], r"--num_workers=-1 must be >= 0"),
        (["--eval_samples_per_class", "1"], r"--eval_samples_per_class must be >= 2 \(the Frechet distance"),
        (
            ["--block_out_channels", "16,30"],
            r"block_out_channels=\(16, 30\): widths \[30\] do not divide by norm_num_groups=8; pick widths",
        ),
        (["--classes_per_task", "4"], r"--classes_per_task=4 leaves a single task .* lower --classes_per_task"),
        (["--replay_samples_per_class", "0"], r"--replay_samples_per_class=0 must be >= 1"),
        (["--classifier_dir", "no/such/folder"], r"--classifier_dir=no/such/folder has no jobs/ folder of kept"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(benchmark, tmp_path, flags, message):
    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit, match=f"benchmark.py: error: {message}"):
        benchmark.main(benchmark.parse_args([*TINY, "--output_dir", str(output_dir), *flags]))
    assert not output_dir.exists()


def test_quick_mode_lowers_the_budget_but_explicit_flags_win(benchmark):
    quick = benchmark.parse_args(["--quick"])
    default = benchmark.parse_args([])
    assert quick.first_task_steps < default.first_task_steps and quick.seeds == "0"
    assert benchmark.parse_args(["--quick", "--seeds", "3,4"]).seeds == "3,4"


@pytest.mark.slow
def test_a_stopped_benchmark_continues_job_by_job(benchmark, tiny_run, tmp_path, monkeypatch):
    output_dir, results = tiny_run
    # Every finished job and the seed's classifier are kept, named after a digest of their settings; the same flags
    # run again redo none of them.
    digest = benchmark.settings_digest(benchmark.job_settings(benchmark.parse_args(TINY)))
    classifier = benchmark.settings_digest(benchmark.classifier_settings(benchmark.parse_args(TINY)))
    kept = sorted(path.name for path in (output_dir / "jobs").iterdir())
    assert f"classifier-seed0-{classifier}.safetensors" in kept and f"funlora-cos-seed0-{digest}.json" in kept
    assert not list((output_dir / "jobs" / "partial").iterdir())  # a kept job's state after its tasks is removed

    def refuse(*args, **kwargs):
        raise AssertionError("a kept job was run again")

    monkeypatch.setattr(benchmark, "run_job", refuse)
    monkeypatch.setattr(benchmark, "make_evaluator", refuse)
    again = benchmark.main(benchmark.parse_args([*TINY, "--output_dir", str(output_dir)]))
    assert again["runs"] == json.loads(json.dumps(results["runs"]))
    monkeypatch.undo()

    # A stop after some jobs: only the missing ones run, and a kept job made with other flags is made again.
    partial = tmp_path / "partial"
    shutil.copytree(output_dir / "jobs", partial / "jobs")
    job = partial / "jobs"
    (job / f"finetune-seed0-{digest}.json").unlink()
    stale = json.loads((job / f"joint-seed0-{digest}.json").read_text())
    stale["settings"]["learning_rate"] = 1.0
    (job / f"joint-seed0-{digest}.json").write_text(json.dumps(stale))
    ran = []
    real_run_job = benchmark.run_job

    def counting(args, key, seed, classifier_state):
        ran.append(key)
        return real_run_job(args, key, seed, classifier_state)

    monkeypatch.setattr(benchmark, "run_job", counting)
    benchmark.main(benchmark.parse_args([*TINY, "--output_dir", str(partial), "--methods", "joint,finetune,lora1"]))
    assert sorted(ran) == ["finetune", "joint"]
    assert json.loads((job / f"joint-seed0-{digest}.json").read_text())["settings"]["learning_rate"] == 2e-3

    # A sweep point in the same folder keeps its jobs beside the others instead of replacing them.
    linear = (job / f"funlora-linear-seed0-{digest}.json").read_bytes()
    ran.clear()
    benchmark.main(
        benchmark.parse_args(
            [*TINY, "--output_dir", str(partial), "--methods", "funlora-linear", "--init_omega", "0.5"]
        )
    )
    assert ran == ["funlora-linear"] and (job / f"funlora-linear-seed0-{digest}.json").read_bytes() == linear
    assert len(list(job.glob("funlora-linear-seed0-*.json"))) == 2
    # ... and is evaluated by the seed's classifier: the generator's flags are not among those it depends on.
    assert [path.name for path in job.glob("classifier-seed0-*.safetensors")] == [
        f"classifier-seed0-{classifier}.safetensors"
    ]

    # One method asked for: the table still reports every job kept with the same settings, in the usual order; a job
    # kept under the older name and before a flag existed matches that flag's value then (LATER_FLAGS).
    older = json.loads((job / f"funlora-cos-seed0-{digest}.json").read_text())
    del older["settings"]["num_functions"]
    (job / "funlora-cos-seed0.json").write_text(json.dumps(older))
    (job / f"funlora-cos-seed0-{digest}.json").unlink()
    monkeypatch.setattr(benchmark, "run_job", refuse)
    one = benchmark.main(benchmark.parse_args([*TINY, "--output_dir", str(partial), "--methods", "lora1"]))
    assert list(one["runs"]) == _expected_rows(benchmark)
    assert one["runs"]["FunLoRA cos"] == json.loads(json.dumps(results["runs"]["FunLoRA cos"]))

    # Two commands side by side in one folder: a job the other one keeps while this one runs joins this one's table.
    finetune = job / f"finetune-seed0-{digest}.json"
    record_of_other = finetune.read_text()
    finetune.unlink()
    (job / f"lora1-seed0-{digest}.json").unlink()

    def other_command_finishes_meanwhile(args, key, seed, classifier_state):
        finetune.write_text(record_of_other)
        return real_run_job(args, key, seed, classifier_state)

    monkeypatch.setattr(benchmark, "run_job", other_command_finishes_meanwhile)
    side = benchmark.main(benchmark.parse_args([*TINY, "--output_dir", str(partial), "--methods", "lora1"]))
    assert list(side["runs"]) == _expected_rows(benchmark)
    assert [run["method"] for run in side["runs"]["fine-tuning"]] == ["finetune"]


@pytest.mark.slow
def test_a_sweep_folder_takes_the_seed_classifier_of_another_folder(benchmark, tiny_run, tmp_path, monkeypatch):
    # A sweep kept in a folder of its own is evaluated by the comparison's classifier: --classifier_dir copies it
    # into the new folder's jobs/ instead of training another one (which on another machine would differ).
    output_dir, _ = tiny_run
    args = benchmark.parse_args([*TINY, "--output_dir", str(tmp_path / "sweep"), "--classifier_dir", str(output_dir)])
    data, tasks = benchmark.load_data(args)

    def refuse(*args, **kwargs):
        raise AssertionError("the classifier was trained again")

    monkeypatch.setattr(benchmark, "make_evaluator", refuse)
    state, accuracy = benchmark.seed_classifier(args, data, tasks, 0, tmp_path / "sweep")
    name = f"classifier-seed0-{benchmark.settings_digest(benchmark.classifier_settings(args))}"
    source = json.loads((output_dir / "jobs" / f"{name}.json").read_text())
    copied = tmp_path / "sweep" / "jobs" / f"{name}.safetensors"
    assert benchmark.sha256_of(copied) == source["result"]["sha256"]
    assert accuracy == source["result"]["real_data_accuracy"]
    assert json.loads(copied.with_suffix(".json").read_text()) == source
    kept = benchmark.load_file(output_dir / "jobs" / f"{name}.safetensors")
    assert all(torch.equal(state[key], kept[key]) for key in kept) and state.keys() == kept.keys()
    # The flag is not a setting of the jobs: the sweep's jobs keep the digest they would have without it.
    assert benchmark.job_settings(args) == benchmark.job_settings(benchmark.parse_args(TINY))

    # A seed the other folder has no classifier for is trained here, as without the flag.
    monkeypatch.undo()
    benchmark.seed_classifier(args, data, tasks, 5, tmp_path / "sweep")
    assert (tmp_path / "sweep" / "jobs" / name.replace("seed0", "seed5")).with_suffix(".safetensors").is_file()
    assert not list((output_dir / "jobs").glob("classifier-seed5-*"))


# What differs between a job run at once and one stopped and resumed: the clocks and the process's peak memory.
_TIMES = ("train_seconds", "train_seconds_per_task", "generation_seconds", "sampling_seconds", "peak_memory_mb")


@pytest.mark.parametrize("method", ["funlora-cos-top15", "lora1", "replay"])
def test_a_job_stopped_part_way_resumes_after_its_last_finished_task(
    benchmark, tiny_run, tmp_path, monkeypatch, method
):
    output_dir, results = tiny_run
    args = benchmark.parse_args([*TINY, "--output_dir", str(tmp_path)])
    data, tasks = benchmark.load_data(args)
    classifier_state, _ = benchmark.seed_classifier(args, data, tasks, 0, output_dir)
    settings = benchmark.job_settings(args)
    folder = benchmark.partial_folder(tmp_path, method, 0, settings)
    real_train_steps = benchmark.train_steps
    trained = []

    def stop_in_task_1(learner, groups, images, labels, batch_sizes, seed, task, args):
        if task == 1:
            raise KeyboardInterrupt("stopped")
        return real_train_steps(learner, groups, images, labels, batch_sizes, seed, task, args)

    monkeypatch.setattr(benchmark, "train_steps", stop_in_task_1)
    with pytest.raises(KeyboardInterrupt):
        benchmark.run_job(args, method, 0, classifier_state)
    kept = sorted(path.name for path in folder.iterdir())
    assert kept == ["model.safetensors", "progress.json"]
    assert json.loads((folder / "progress.json").read_text())["task"] == 0

    def counting(learner, groups, images, labels, batch_sizes, seed, task, args):
        trained.append(task)
        return real_train_steps(learner, groups, images, labels, batch_sizes, seed, task, args)

    monkeypatch.setattr(benchmark, "train_steps", counting)
    resumed = benchmark.run_job(args, method, 0, classifier_state)
    # Only task 1 trains again, and the job ends as the uninterrupted one did: every metric of every task, the
    # top-k layers chosen after task 0, the ranks, the bit-identical old samples.
    assert trained == [1] and resumed.pop("resumed_after_task") == 0
    whole = next(run for run in results["runs"][resumed["name"]] if run["seed"] == 0)

    def strip(run: dict) -> dict:
        run = {k: v for k, v in json.loads(json.dumps(run)).items() if k not in _TIMES}
        run["stages"] = [{k: v for k, v in stage.items() if k != "eval_seconds"} for stage in run["stages"]]
        return run

    assert strip(resumed) == strip(whole)
    assert (
        resumed["train_seconds_per_task"][0] == json.loads((folder / "progress.json").read_text())["train_seconds"][0]
    )

    # A kept state made with other settings, or whose tensors changed, is not resumed: the job starts over.
    record = json.loads((folder / "progress.json").read_text())
    (folder / "progress.json").write_text(json.dumps({**record, "settings": {**settings, "learning_rate": 1.0}}))
    assert benchmark.read_partial(folder, settings) is None
    (folder / "progress.json").write_text(json.dumps(record))
    assert benchmark.read_partial(folder, settings) is not None
    with open(folder / "model.safetensors", "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    assert benchmark.read_partial(folder, settings) is None


def _process_state(pid: int) -> str | None:
    """The state letter of a process from /proc ('Z' for a zombie), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def test_a_killed_benchmark_takes_its_workers_with_it(tmp_path):
    # The pool as main() builds it; the parent is killed while its worker runs a long job.
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time, multiprocessing\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        f"sys.path.insert(0, {str(BENCHMARK_SCRIPT.parent)!r})\n"
        "from benchmark import exit_with_parent\n"
        "if __name__ == '__main__':\n"
        "    context = multiprocessing.get_context('spawn')\n"
        "    with ProcessPoolExecutor(1, mp_context=context, initializer=exit_with_parent,\n"
        "                             initargs=(os.getpid(), 0.1)) as pool:\n"
        "        print(pool.submit(os.getpid).result(), flush=True)\n"
        "        pool.submit(time.sleep, 600).result()\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        assert _process_state(worker) not in (None, "Z")
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 120  # the worker checks every 0.1 s; the bound only guards against a hang
        while _process_state(worker) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _process_state(worker) in (None, "Z"), "the worker trained on after its benchmark was killed"
    finally:
        parent.kill()


def test_a_flag_added_later_keeps_the_names_of_earlier_jobs(benchmark):
    # --scheduler_shift came after kept files were named by a digest of their settings: at the value earlier jobs
    # ran with (1, no shift) it leaves the digest as it was; another value is another job.
    settings = benchmark.job_settings(benchmark.parse_args(TINY))
    before = {k: v for k, v in settings.items() if k != "scheduler_shift"}
    assert settings["scheduler_shift"] == 1.0
    assert benchmark.settings_digest(settings) == benchmark.settings_digest(before)
    assert benchmark.same_settings(before, settings)
    shifted = benchmark.job_settings(benchmark.parse_args([*TINY, "--scheduler_shift", "3"]))
    assert benchmark.settings_digest(shifted) != benchmark.settings_digest(settings)
    assert not benchmark.same_settings(before, shifted)


@pytest.mark.slow
def test_num_functions_sets_p_of_the_functional_rows(benchmark, tmp_path):
    methods = ["--methods", "funlora-rshift,funlora-linear", "--num_functions", "3"]
    results = benchmark.main(benchmark.parse_args([*TINY, "--output_dir", str(tmp_path), *methods]))
    (rshift,), (linear,) = results["runs"]["FunLoRA rshift"], results["runs"]["FunLoRA linear"]
    # rshift's F_y is a sum of p rank-1 terms: its rank is at most p, whatever training did
    for task in rshift["rank_per_task"]:
        assert task["trained"]["num_functions"] == 3 and task["trained"]["max"] <= 3, task
    assert all(task["trained"]["num_functions"] == 1 for task in linear["rank_per_task"])
    assert "| FunLoRA rshift | 0 | 3 |" in (tmp_path / "results.md").read_text()


def test_later_task_batch_size_and_the_joint_budget(benchmark):
    args = benchmark.parse_args([*TINY, "--train_batch_size", "8", "--task_train_batch_size", "4"])
    assert benchmark.task_batch_sizes(args, 0) == [8] * 4 and benchmark.task_batch_sizes(args, 1) == [4] * 3
    # Without --task_train_batch_size every task takes --train_batch_size.
    assert benchmark.task_batch_sizes(benchmark.parse_args(TINY), 1) == [8] * 3


def test_recipe_sets_the_flags_the_benchmark_declares(benchmark):
    recipe = load_example("protocol_args").RECIPES["fashion-mnist"]
    args = benchmark.parse_args(["--recipe", "fashion-mnist", "--task_steps", "5"])
    shared = {name: value for name, value in recipe.items() if hasattr(benchmark.parse_args([]), name)}
    assert "function" not in shared and "init_omega" in shared and "task_train_batch_size" in shared
    assert {name: getattr(args, name) for name in shared} == {**shared, "task_steps": 5}
    assert not hasattr(args, "function")  # each method names its own family


# The comparison's folder and every sweep folder inside it.
STORES = sorted(
    str(path.parent.relative_to(ROOT / "docs" / "benchmark"))
    for path in (ROOT / "docs" / "benchmark" / "fashion_mnist").rglob("results.json")
)


def test_the_fashion_mnist_comparison_and_its_sweeps_are_published():
    assert {"fashion_mnist", "fashion_mnist/sweep_init_omega_1", "fashion_mnist/sweep_init_std_3"} <= set(STORES)


@pytest.mark.parametrize("folder", STORES)
def test_published_folders_keep_the_jobs_of_their_tables(benchmark, folder):
    # docs/benchmark/<folder> is the comparison's store as well as its report: every run of its results.json is a job
    # kept in its jobs/ under the settings it was made with, so `--output_dir docs/benchmark/<folder>` continues the
    # comparison instead of running it again; every kept classifier is the file its record names.
    output_dir = ROOT / "docs" / "benchmark" / folder
    results = json.loads((output_dir / "results.json").read_text())
    settings = {k: v for k, v in results["settings"].items() if k not in benchmark.NOT_JOB_SETTINGS}
    # A command of today holds the flags added since (LATER_FLAGS) at the values those jobs ran with: it finds them.
    today = {**benchmark.LATER_FLAGS, **settings}
    for runs in results["runs"].values():
        for run in runs:
            assert benchmark.read_kept(output_dir, f"{run['method']}-seed{run['seed']}", settings) == run
            assert benchmark.read_kept(output_dir, f"{run['method']}-seed{run['seed']}", today) == run
    for record in (output_dir / "jobs").glob("classifier-seed*.json"):
        kept = json.loads(record.read_text())
        assert benchmark.sha256_of(record.with_suffix(".safetensors")) == kept["result"]["sha256"]


def test_a_diverged_job_is_named_and_the_others_finish(benchmark, tmp_path):
    """An adapter learning rate far too large: FunLoRA's loss becomes nan in task 0; joint training (which does not
    use that rate) still finishes and makes the table, the diverged job keeps no result, and the command fails."""
    methods = ["--methods", "joint,funlora-linear", "--adapter_learning_rate", "1e30"]
    with pytest.raises(SystemExit) as info:
        benchmark.main(benchmark.parse_args([*TINY, "--output_dir", str(tmp_path), *methods]))
    assert str(info.value.code) == "benchmark.py: error: 1 job(s) diverged (FunLoRA linear seed 0): see above."
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["runs"]) == ["joint training (upper bound)"]
    [job] = results["diverged"]
    assert (job["method"], job["seed"]) == ("funlora-linear", 0)
    assert re.fullmatch(
        r"training diverged: the loss of task 0 is (nan|-?inf) at step \d+ of the task, which trains the backbone and "
        r"adapter task_0: .* Lower --learning_rate \(now 0\.002\) or --adapter_learning_rate \(now 1e\+30\)\.",
        job["message"],
    ), job["message"]
    table = (tmp_path / "results.md").read_text()
    assert f"Diverged, not in the table: FunLoRA linear seed 0: {job['message']}" in table
    assert "| joint training (upper bound) |" in table and "| FunLoRA linear |" not in table
    assert not list((tmp_path / "jobs").glob("funlora-linear-seed0-*.json"))
