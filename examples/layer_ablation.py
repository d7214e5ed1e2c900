"""Layer-importance ablation: which convs does a new task need to adapt?

Runs `examples/train.py` once on every conv with the layers scored after task 0 (`--select_layers fraction=1`), then
again and again from that run's task 0 (`--start_from_run`), each time adapting a different set of convs in tasks 1,
2, ... (`--target_modules`):

- `all`: every conv (the default protocol);
- `top` / `bottom`: the k convs with the largest / smallest |I_l| (`select_target_modules` of
  `funlora_peft.continual.importance`);
- `random`: k convs drawn at random (a different draw per seed).

Every (set, k, seed) continues from the same task-0 backbone, so the sets differ only in the convs the later tasks
adapt; the seed changes the adapters' initialisation, the batches and the evaluation. The training script evaluates
every run (CAS over all classes, recognition accuracy, FD after the last task). Writes `results.md`, `results.json` and
`importance.png` to --output_dir.

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
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import train

from funlora_peft.continual.importance import block_of, random_target_modules, select_target_modules
from funlora_peft.run_folder import CHECKPOINT_PREFIX, IMPORTANCE_PLOT, read_importance, read_metrics

STRATEGIES = ("all", "top", "bottom", "random")
SCRIPT = "layer_ablation.py"
# Flags the ablation sets itself for every run of train.py.
OWN_FLAGS = ("--output_dir", "--seed", "--select_layers", "--target_modules", "--start_from_run", "--push_to_hub")


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
                f"{SCRIPT}: error: --{flag}={getattr(args, flag)!r} must be integers, e.g. 5,10"
            ) from None
        if not values or (flag == "ks" and min(values) < 1):
            raise SystemExit(f"{SCRIPT}: error: --{flag}={getattr(args, flag)!r} needs positive integers.")
        setattr(args, flag, values)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown or not args.strategies:
        raise SystemExit(
            f"{SCRIPT}: error: --strategies={','.join(args.strategies)!r}: unknown {unknown}; choose among "
            f"{list(STRATEGIES)}."
        )
    for flag in OWN_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in train_argv):
            raise SystemExit(f"{SCRIPT}: error: {flag} is set by the ablation itself; leave it out.")
    return args, train_argv


def run_training(train_argv: list[str], folder: Path, seed: int, *extra: str) -> float:
    """One run of the training script into `folder`; returns its wall-clock seconds."""
    if folder.exists():
        shutil.rmtree(folder)
    started = time.perf_counter()
    argv = [*train_argv, *extra, "--output_dir", str(folder), "--seed", str(seed), "--report_to", "none"]
    argv += ["--checkpointing_steps", str(10**9), "--checkpoints_total_limit", "1"]  # end-of-task checkpoints only
    train.main(train.parse_args(argv))
    for checkpoint in folder.glob(f"{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(checkpoint)
    return time.perf_counter() - started


def main() -> None:
    args, train_argv = parse_args()
    output_dir = Path(args.output_dir)
    if args.report_only:
        data = json.loads((output_dir / "results.json").read_text())
        report = summarise(data["runs"], data["importance"], data["task_layout"], data.get("seconds"), None)
        (output_dir / "results.md").write_text(report)
        print(report)
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # Task 0 once, on every conv, with the layers scored after it (fraction=1 keeps every conv for its later tasks:
    # the run is also the set `all` with seed 0).
    base = output_dir / "task0"
    base_seconds = run_training(train_argv, base, 0, "--select_layers", "fraction=1")
    importance = read_importance(base)
    scores = importance.scores
    shutil.copy(base / IMPORTANCE_PLOT, output_dir / IMPORTANCE_PLOT)
    base_metrics = read_metrics(base)
    task0_seconds = base_metrics.tasks[0].train_seconds + base_metrics.tasks[0].eval_seconds + importance.seconds
    print(
        f"task 0 trained, layers scored ({importance.detail}), tasks 1+ on all convs: {base_seconds:.0f}s", flush=True
    )
    ks = [k for k in args.ks if k <= len(scores)]

    configs = []
    for strategy in args.strategies:
        for k in [None] if strategy == "all" else ks:
            for seed in args.seeds if strategy == "random" else args.fixed_seeds:
                configs.append((strategy, k, seed))

    results = []
    for strategy, k, seed in configs:
        name = f"{strategy}" + (f"-k{k}" if k else "") + f"-seed{seed}"
        if strategy == "all":
            selected = list(scores)
        elif strategy == "random":
            selected = random_target_modules(scores, k, seed=seed)
        else:
            selected = select_target_modules(scores, top_k=k, largest=strategy == "top")
        folder = output_dir / name
        if strategy == "all" and seed == 0:
            folder, seconds = base, base_seconds  # the first run is this one
        else:
            extra = ["--start_from_run", str(base)]
            if strategy != "all":
                extra += ["--target_modules", ",".join(selected)]
            seconds = run_training(train_argv, folder, seed, *extra)
        metrics = read_metrics(folder)
        final = metrics.tasks[-1]
        result_row = {
            "strategy": strategy,
            "k": k if k else len(scores),
            "seed": seed,
            "layers": selected,
            "cas": final.cas,
            "recognition": final.recognition,
            "accuracy_per_task": final.accuracy_per_task,
            "fd": final.fd,
            "extra_parameters_per_class": metrics.tasks[1].extra_parameters_per_class,
            "train_seconds": round(sum(row.train_seconds for row in metrics.tasks[1:]), 1),
            "seconds": round(seconds, 1),
        }
        results.append(result_row)
        print(
            f"{name}: CAS {final.cas:.4f} | recognition {final.recognition:.4f} | FD {final.fd:.2f} | "
            f"{result_row['extra_parameters_per_class']} parameters per class | {seconds:.0f}s",
            flush=True,
        )
        if not args.keep_runs and folder != base:
            shutil.rmtree(folder)
        data = {"importance": importance.to_dict(), "task_layout": base_metrics.task_layout, "runs": results}
        data.update(seconds=round(time.perf_counter() - started, 1), task0_seconds=round(task0_seconds, 1))
        (output_dir / "results.json").write_text(json.dumps(data, indent=1))

    report = summarise(
        results, importance.to_dict(), metrics.task_layout, time.perf_counter() - started, task0_seconds
    )
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
    sys.exit(main())
