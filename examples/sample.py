"""Sample a PNG grid (one row per class) from a FunLoRA run folder or a Hugging Face Hub repo with the same layout.

Commands (from the repository root), after `examples/train.py` wrote `runs/digits`:

```bash
python examples/sample.py runs/digits --output samples.png                          # every class, 8 per row
python examples/sample.py runs/digits --classes 0,3,7 --num_samples 16 --output 037.png
python examples/sample.py runs/digits --tasks task_0,task_2 --output tasks_0_2.png   # the classes of 2 tasks
python examples/sample.py user/funlora-digits --classes 3,7 --revision main --output hub.png
```

`--classes` alone loads only the tasks that own those classes (for a Hub repo only their adapters are downloaded, as
the run's `funlora.json` index says); `--tasks` names the tasks to load; with neither, every task is loaded. Each
class is sampled with its own seeded generator (`funlora_peft.continual.evaluation.generate_per_class`), so a class's row does
not depend on the other classes asked for. With `HF_HUB_OFFLINE=1` a Hub repo is read from the local cache.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from funlora_peft import FunLoRAPipeline, download_index
from funlora_peft.continual.evaluation import generate_per_class
from funlora_peft.continual.training import make_image_grid, pipeline_sample_fn
from funlora_peft.run_folder import read_index


def _comma_list(kind: type):
    def parse(text: str) -> list:
        try:
            values = [kind(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        return values

    return parse


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write a PNG grid of samples (one row per class) from a FunLoRA run folder or Hub repo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("source", help="A run folder written by examples/train.py, or a Hub repo id 'user/name'.")
    parser.add_argument(
        "--classes",
        type=_comma_list(int),
        default=None,
        help="Comma-separated class ids, one grid row each (default: every class of the loaded tasks).",
    )
    parser.add_argument(
        "--tasks",
        type=_comma_list(str),
        default=None,
        help="Comma-separated tasks to load, e.g. task_0,task_2 (default: the tasks owning --classes, else all).",
    )
    parser.add_argument("--revision", default=None, help="Branch, tag or commit id of a Hub repo (default: main).")
    parser.add_argument("--cache_dir", default=None, help="Hugging Face cache folder (default: HF_HUB_CACHE).")
    parser.add_argument("--output", type=Path, default=Path("samples.png"), help="The PNG file to write.")
    parser.add_argument("-n", "--num_samples", type=int, default=8, help="Samples per class (grid columns).")
    parser.add_argument("--num_inference_steps", type=int, default=20, help="Euler steps (UNet evaluations).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the per-class noise generators.")
    parser.add_argument("--scale", type=int, default=4, help="Enlarge the grid this many times (nearest neighbour).")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device to sample on."
    )
    args = parser.parse_args(input_args)
    for flag in ("num_samples", "num_inference_steps", "scale"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if args.output.suffix.lower() != ".png":
        parser.error(f"--output must name a .png file, got {str(args.output)!r}.")
    return args


def tasks_owning(source: str, class_ids: list[int], revision: str | None, cache_dir: str | None) -> list[str]:
    """The tasks of the run's index that own `class_ids`, in run order (only the index is downloaded)."""
    if Path(source).is_dir():
        index = read_index(source)
    else:
        index = download_index(source, revision=revision, cache_dir=cache_dir)[1]
    unknown = [c for c in class_ids if index.owner_of(c) is None]
    if unknown:
        known = sorted(c for task in index.tasks for c in task.class_ids)
        raise SystemExit(f"sample.py: error: --classes {unknown} belong to no task of {source}; its classes: {known}.")
    owners = {index.owner_of(c) for c in class_ids}
    return [name for name in index.task_names if name in owners]


def main(args: argparse.Namespace) -> Path:
    tasks = args.tasks
    if tasks is None and args.classes is not None:
        tasks = tasks_owning(args.source, args.classes, args.revision, args.cache_dir)
    hub_kwargs = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    try:
        pipe = FunLoRAPipeline.from_pretrained(args.source, tasks=tasks, revision=args.revision, **hub_kwargs)
        pipe.to(args.device)
        pipe.set_progress_bar_config(disable=True)
        class_ids = args.classes if args.classes is not None else pipe.class_ids
        sample_fn = pipeline_sample_fn(pipe, args.num_inference_steps)
        images, _ = generate_per_class(sample_fn, class_ids, args.num_samples, seed=args.seed)  # in [-1, 1]
    except ValueError as error:  # the loaders and the pipeline name the problem and the fix
        raise SystemExit(f"sample.py: error: {error}") from None
    grid = make_image_grid((images.cpu() + 1) / 2, rows=len(class_ids), scale=args.scale)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(f".{args.output.name}")
    grid.save(tmp, format="PNG")
    os.replace(tmp, args.output)
    print(f"{args.output}: classes {class_ids}, {args.num_samples} samples each, {grid.width}x{grid.height} pixels")
    return args.output


if __name__ == "__main__":
    main(parse_args())
