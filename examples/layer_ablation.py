"""Layer-importance ablation: which convs does a new task need to adapt?

Trains task 0 once (backbone + task 0's adapter on every conv, exactly as `examples/train.py`), scores the convs with
the importance criterion, then trains tasks 1, 2, ... again and again, each time adapting a different set of convs:

- `all`: every conv (the default protocol);
- `top` / `bottom`: the k convs with the largest / smallest |I_l| (`funlora_peft.continual.importance.select_target_modules`);
- `random`: k convs drawn at random (a different draw per seed).

Every (set, k, seed) continues from the same task-0 backbone with the training script's own `train_task`, so the sets
differ only in the convs the later tasks adapt; the seed changes the adapters' initialisation, the batches and the
evaluation. After the last task the generator is evaluated as in the training script (CAS over all classes, recognition
accuracy, FD). Writes `results.md`, `results.json` and `importance.png` to --output_dir.

```bash
python examples/layer_ablation.py --output_dir runs/layer_ablation              # k in {5, 10, 15}, 3 seeds each
python examples/layer_ablation.py --fixed_seeds 0 --eval_samples_per_class 50  # the docs' table: 3 random draws
python examples/layer_ablation.py --output_dir runs/ablation-quick --ks 5 --seeds 0 --strategies all,top,bottom
```

Any other flag goes to the training script (e.g. `--function rshift`, `--task_steps 50`, `--eval_samples_per_class
50`). Timings of the docs' table are in docs/layer_importance.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from funlora_peft.continual.importance import (
    IMPORTANCE_FILE,
    IMPORTANCE_PLOT,
    block_of,
    random_target_modules,
    select_target_modules,
)
from funlora_peft.continual.training import (
    CHECKPOINT_PREFIX,
    Checkpointer,
    TrainingState,
    adapter_parameter_count,
    save_adapter,
)
from funlora_peft.run_folder import INDEX_FILE

STRATEGIES = ("all", "top", "bottom", "random")


def load_training_script():
    path = Path(__file__).resolve().parent / "train.py"
    spec = importlib.util.spec_from_file_location("funlora_train_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other flags go to train.py.")
    parser.add_argument("--output_dir", default="runs/layer_ablation", help="Folder of the results and the runs.")
    parser.add_argument("--ks", default="5,10,15", help="Numbers k of adapted convs, comma-separated.")
    parser.add_argument("--seeds", default="0,1,2", help="Seeds of the later tasks, comma-separated.")
    parser.add_argument(
        "--fixed_seeds",
        default=None,
        help="Seeds for the sets that do not depend on the seed (all, top, bottom); default: --seeds. The seeds of "
        "`random` also draw its convs.",
    )
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES), help=f"Conv sets to compare, among {list(STRATEGIES)}."
    )
    parser.add_argument(
        "--keep_runs", action="store_true", help="Keep every run folder (default: only the results and task 0)."
    )
    parser.add_argument(
        "--report_only", action="store_true", help="Rewrite results.md from --output_dir's results.json; no training."
    )
    args, train_argv = parser.parse_known_args(argv)
    if args.fixed_seeds is None:
        args.fixed_seeds = args.seeds
    for flag in ("ks", "seeds", "fixed_seeds"):
        try:
            values = [int(v) for v in getattr(args, flag).split(",") if v.strip()]
        except ValueError:
            raise SystemExit(
                f"layer_ablation.py: error: --{flag}={getattr(args, flag)!r} must be integers, e.g. 5,10"
            ) from None
        if not values or (flag == "ks" and min(values) < 1):
            raise SystemExit(f"layer_ablation.py: error: --{flag}={getattr(args, flag)!r} needs positive integers.")
        setattr(args, flag, values)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown or not args.strategies:
        raise SystemExit(
            f"layer_ablation.py: error: --strategies={','.join(args.strategies)!r}: unknown {unknown}; choose among "
            f"{list(STRATEGIES)}."
        )
    for flag in ("--output_dir", "--seed", "--select_layers", "--resume_from_checkpoint", "--push_to_hub"):
        if any(a == flag or a.startswith(flag + "=") for a in train_argv):
            raise SystemExit(f"layer_ablation.py: error: {flag} is set by the ablation itself; leave it out.")
    return args, train_argv


def train_args(train, train_argv: list[str], output_dir: Path, seed: int) -> argparse.Namespace:
    targs = train.parse_args(
        [
            *train_argv,
            "--output_dir",
            str(output_dir),
            "--seed",
            str(seed),
            "--report_to",
            "none",
            "--overwrite_output_dir",
        ]
    )
    targs.checkpointing_steps = 10**9  # checkpoints only at the end of each task; removed after the run
    targs.checkpoints_total_limit = 1
    return targs


def write_outputs(train, folder: Path, run, upto_task: int) -> None:
    """The run folder after task `upto_task` (adapter, index), without the training script's per-task evaluation."""
    save_adapter(run.model, f"task_{upto_task}", folder)
    train.write_run_index(folder, run, upto_task)


def main() -> None:
    args, train_argv = parse_args()
    if args.report_only:
        data = json.loads((Path(args.output_dir) / "results.json").read_text())
        report = summarise(data["runs"], data["importance"], data["task_layout"], data.get("seconds"), None)
        (Path(args.output_dir) / "results.md").write_text(report)
        print(report)
        return
    train = load_training_script()
    torch.set_num_threads(1)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available() or None)
    hooks = Checkpointer(accelerator)
    started = time.perf_counter()

    # Task 0, once: the training script's own preparation, training and outputs.
    base = output_dir / "task0"
    base_args = train_args(train, train_argv, base, seed=0)
    base_args.select_layers = "top_k=1"  # only to have the scores written; every set is chosen below
    run = train.prepare_run(base_args, accelerator)
    if len(run.tasks) < 2:
        raise SystemExit("layer_ablation.py: error: the task layout has one task; later tasks are what is compared.")
    evaluator = train.Evaluator(base_args, run.data, run.tasks)
    metrics = {"tasks": []}
    run.model.to(accelerator.device)
    (base / "samples").mkdir(parents=True, exist_ok=True)
    global_step, result = train.train_task(base_args, accelerator, run, hooks, 0, 0)
    train.write_task_outputs(base_args, accelerator, run, evaluator, metrics, 0, result, global_step)
    train.select_layers(base_args, accelerator, run)
    importance = json.loads((base / IMPORTANCE_FILE).read_text())
    scores = importance["scores"]
    shutil.copy(base / IMPORTANCE_PLOT, output_dir / IMPORTANCE_PLOT)
    task0_seconds = time.perf_counter() - started
    print(f"task 0 trained and layers scored ({importance['detail']}) in {task0_seconds:.0f}s", flush=True)
    ks = [k for k in args.ks if k <= len(scores)]

    configs = []
    for strategy in args.strategies:
        for k in [None] if strategy == "all" else ks:
            for seed in args.seeds if strategy == "random" else args.fixed_seeds:
                configs.append((strategy, k, seed))

    results = []
    evaluators: dict[int, object] = {}
    for strategy, k, seed in configs:
        name = f"{strategy}" + (f"-k{k}" if k else "") + f"-seed{seed}"
        if strategy == "all":
            selected = None
        elif strategy == "random":
            selected = random_target_modules(scores, k, seed=seed)
        else:
            selected = select_target_modules(scores, top_k=k, largest=strategy == "top")
        folder = output_dir / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for part in ("backbone", "task_0", INDEX_FILE):
            source = base / part
            shutil.copytree(source, folder / part) if source.is_dir() else shutil.copy(source, folder / part)
        targs = train_args(train, train_argv, folder, seed)
        if seed not in evaluators:
            evaluators[seed] = train.Evaluator(targs, run.data, run.tasks)
        config = train.unet_config(targs, run.data.num_channels)
        model = train.build_model(targs, config, run.tasks, 1, folder, selected).to(accelerator.device)
        key = train.run_key(targs, run.tasks, accelerator.num_processes, accelerator.mixed_precision)
        sub = train.Run(
            data=run.data,
            tasks=run.tasks,
            model=model,
            key=key,
            start=TrainingState(task=1, task_step=0, global_step=0, run_key=key),
            selected=selected,
        )
        t0 = time.perf_counter()
        global_step, train_seconds = 0, 0.0
        for task in range(1, len(run.tasks)):
            global_step, result = train.train_task(targs, accelerator, sub, hooks, task, global_step)
            train_seconds += result.train_seconds
            write_outputs(train, folder, sub, task)
        row, _ = evaluators[seed](folder, len(run.tasks) - 1, accelerator.device)
        per_class = adapter_parameter_count(model, "task_1") // len(run.tasks[1])
        result_row = {
            "strategy": strategy,
            "k": k if k else len(scores),
            "seed": seed,
            "layers": selected if selected is not None else list(scores),
            "cas": row["cas"],
            "recognition": row["recognition"],
            "accuracy_per_task": row["accuracy_per_task"],
            "fd": row["fd"],
            "extra_parameters_per_class": per_class,
            "train_seconds": round(train_seconds, 1),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        results.append(result_row)
        print(
            f"{name}: CAS {row['cas']:.4f} | recognition {row['recognition']:.4f} | FD {row['fd']:.2f} | "
            f"{per_class} parameters per class | {result_row['seconds']:.0f}s",
            flush=True,
        )
        for checkpoint in folder.glob(f"{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(checkpoint)
        if not args.keep_runs:
            shutil.rmtree(folder)
        data = {"importance": importance, "task_layout": run.tasks, "runs": results}
        data.update(seconds=round(time.perf_counter() - started, 1), task0_seconds=round(task0_seconds, 1))
        (output_dir / "results.json").write_text(json.dumps(data, indent=1))

    report = summarise(results, importance, run.tasks, time.perf_counter() - started, task0_seconds)
    (output_dir / "results.md").write_text(report)
    print(report)


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def resolution_level(name: str, num_levels: int) -> int:
    """0 for the convs working at the input resolution (conv_in, down_blocks.0, the last up block, conv_out), up to
    num_levels - 1 for the deepest (the last down block, the mid block, up_blocks.0)."""
    part = block_of(name)
    if part in ("in", "out"):
        return 0
    if part == "mid":
        return num_levels - 1
    index = int(name.split(".")[1])
    return index if part == "down" else num_levels - 1 - index


def summarise(results: list[dict], importance: dict, tasks, seconds: float | None, task0_seconds: float | None) -> str:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        groups.setdefault((r["strategy"], r["k"]), []).append(r)
    scores = importance["scores"]
    names = list(scores)
    lines = [
        f"Layer-importance ablation: task layout {tasks}; tasks 1-{len(tasks) - 1} adapt the listed convs, task 0 "
        f"adapts all {len(names)}. Scores from {importance['detail']}. CAS and recognition over all "
        f"{sum(len(t) for t in tasks)} classes after the last task, mean +- std over seeds "
        f"{sorted({r['seed'] for r in results})}"
        + (f". Total {seconds / 60:.1f} min" if seconds else "")
        + (f" (task 0 and scores {task0_seconds:.0f} s)." if task0_seconds else "."),
        "",
        "| convs adapted by tasks 1+ | k | CAS | recognition | FD | extra parameters per class | train s (tasks 1+) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    order = {s: i for i, s in enumerate(STRATEGIES)}
    for (strategy, k), rows in sorted(groups.items(), key=lambda item: (item[0][1], order[item[0][0]])):
        lines.append(
            f"| {strategy} | {k} | {_mean_std([r['cas'] for r in rows])} | "
            f"{_mean_std([r['recognition'] for r in rows])} | {_mean_std([r['fd'] for r in rows])} | "
            f"{round(statistics.mean(r['extra_parameters_per_class'] for r in rows)):,} | "
            f"{statistics.mean(r['train_seconds'] for r in rows):.0f} |"
        )
    ranked = sorted(range(len(names)), key=lambda j: -abs(scores[names[j]]))
    lines += ["", "Convs by |I_l| (index in U-Net order, part, name, I_l):", ""]
    for title, part in (("most important", ranked[:5]), ("least important", ranked[-5:][::-1])):
        lines.append(
            f"- {title}: " + "; ".join(f"#{j} {block_of(names[j])} `{names[j]}` {scores[names[j]]:+.4f}" for j in part)
        )
    num_levels = 1 + max(int(n.split(".")[1]) for n in names if block_of(n) == "down")
    levels = [resolution_level(n, num_levels) for n in names]
    top10, bottom10 = ranked[:10], ranked[-10:]
    lines += [
        "",
        "Convs per resolution level (0 = the input resolution: conv_in, down_blocks.0, the last up block, "
        f"conv_out; {num_levels - 1} = the deepest):",
        "",
        "| level | convs | among the 10 most important | among the 10 least important |",
        "|---:|---:|---:|---:|",
    ]
    for level in range(num_levels):
        lines.append(
            f"| {level} | {levels.count(level)} | {sum(levels[j] == level for j in top10)} | "
            f"{sum(levels[j] == level for j in bottom10)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
