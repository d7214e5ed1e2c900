"""The `funlora` command: sample a grid from a run folder or Hub repo, or download some of its tasks.

```bash
funlora sample me/funlora-digits --classes 3,7 -n 16 --out grid.png      # loads only the tasks owning 3 and 7
funlora sample runs/digits --classes 0 --steps 50 --seed 1 --out zero.png
funlora download me/funlora-digits --tasks task_0,task_2 --revision main  # prints the local folder
```

Errors in the arguments exit with status 2 and a message naming the argument and the fix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class ids such as 3,7, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one class id such as 3,7, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated task names such as task_0,task_2, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `funlora` (subcommands `sample` and `download`)."""
    parser = argparse.ArgumentParser(prog="funlora", description="Sample from or download FunLoRA runs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{sample,download}")

    hub = argparse.ArgumentParser(add_help=False)
    hub.add_argument("--revision", default=None, help="Branch, tag or commit id of a Hub repo (default: main).")
    hub.add_argument("--cache_dir", default=None, help="Hugging Face cache folder (default: HF_HUB_CACHE).")
    hub.add_argument("--token", default=None, help="Hugging Face token for private repos (default: your login).")

    sample = commands.add_parser(
        "sample", parents=[hub], help="Write a PNG grid of samples, one row per class.", description="Sample a grid."
    )
    sample.add_argument("source", metavar="REPO_OR_FOLDER", help="A run folder or a Hub repo id 'user/name'.")
    sample.add_argument("--classes", type=_int_list, required=True, help="Comma-separated class ids, e.g. 3,7.")
    sample.add_argument("-n", "--num_samples", type=_positive, default=8, help="Samples per class (grid columns).")
    sample.add_argument("--out", type=Path, required=True, help="Output PNG file.")
    sample.add_argument(
        "--tasks",
        type=_name_list,
        default=None,
        help="Comma-separated tasks to load (default: the tasks owning --classes, as the index says).",
    )
    sample.add_argument("--steps", type=_positive, default=20, help="ODE steps (UNet evaluations per sample).")
    sample.add_argument("--seed", type=int, default=0, help="Seed of the initial noise (each row reseeds with it).")

    download = commands.add_parser(
        "download",
        parents=[hub],
        help="Download the backbone and some tasks; print the folder.",
        description="Download the index, the backbone and the named tasks of a Hub repo; print the local folder.",
    )
    download.add_argument("source", metavar="REPO", help="Hub repo id 'user/name'.")
    download.add_argument("--tasks", type=_name_list, default=None, help="Comma-separated tasks (default: all).")
    download.add_argument("--local_dir", type=Path, default=None, help="Download into this folder, not the cache.")
    return parser


def _index_of(source: str, args: argparse.Namespace):
    from .hub import download_index
    from .run_folder import read_index

    if Path(source).is_dir():
        return read_index(source)
    return download_index(source, revision=args.revision, token=args.token, cache_dir=args.cache_dir)[1]


def _sample(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from .continual.training import make_image_grid
    from .pipeline import FunLoRAPipeline

    if args.out.suffix.lower() != ".png":
        parser.error(f"--out must name a .png file, got {str(args.out)!r}.")
    tasks = args.tasks
    index = _index_of(args.source, args)
    if tasks is None:
        unknown = [c for c in args.classes if index.owner_of(c) is None]
        if unknown:
            known = sorted(c for task in index.tasks for c in task.class_ids)
            parser.error(f"--classes {unknown} belong to no task of {args.source}; its classes are {known}.")
        owners = {index.owner_of(c) for c in args.classes}
        tasks = [name for name in index.task_names if name in owners]
    pipe = FunLoRAPipeline.from_pretrained(
        args.source, tasks=tasks, revision=args.revision, token=args.token, cache_dir=args.cache_dir
    )
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for class_id in args.classes:
        generator = torch.Generator().manual_seed(args.seed)
        rows.append(
            pipe(
                class_labels=[class_id] * args.num_samples,
                num_inference_steps=args.steps,
                generator=generator,
                output_type="pt",
            ).images
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Images side by side, one row per class, at their own size (no padding, no enlarging).
    make_image_grid(torch.cat(rows), rows=len(rows), padding=0, scale=1).save(args.out, format="PNG")
    print(args.out)
    return 0


def _download(args: argparse.Namespace) -> int:
    from .hub import download_run

    folder = download_run(
        args.source,
        tasks=args.tasks,
        revision=args.revision,
        token=args.token,
        cache_dir=args.cache_dir,
        local_dir=args.local_dir,
    )
    print(folder)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `funlora` with `argv` (default: the command line); returns 0, or exits with status 2 on bad input.

    Example:

        ```py
        >>> from funlora_peft.cli import main
        >>> main(["sample", "runs/digits", "--classes", "3,7", "-n", "4", "--out", "grid.png"])
        0
        ```
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "sample":
            return _sample(args, parser)
        return _download(args)
    except ValueError as err:
        # Loader errors name the problem and the fix already; show them without a traceback.
        parser.exit(2, f"funlora {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
