"""The `funlora` command: sample a grid from a run folder or Hub repo, download some of its tasks, or inspect them.

```bash
funlora sample me/funlora-digits --classes 3,7 --num_samples 16 --output grid.png   # loads only the tasks of 3 and 7
funlora sample runs/digits --classes 0 --num_inference_steps 50 --seed 1 --output zero.png
funlora sample runs/digits --tasks task_0,task_2 --output tasks_0_2.png             # every class of two tasks
funlora download me/funlora-digits --tasks task_0,task_2 --revision main            # prints the local folder
funlora inspect runs/digits --output_dir plots/   # rank of F_y per layer, alpha / omega over classes (the paper's
                                                  # Figs. 4 and 5): rank.png, alpha_omega.png, diagnostics.json
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
    parser = argparse.ArgumentParser(prog="funlora", description="Sample from, download or inspect FunLoRA runs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{sample,download,inspect}")

    hub = argparse.ArgumentParser(add_help=False)
    hub.add_argument("--revision", default=None, help="Branch, tag or commit id of a Hub repo (default: main).")
    hub.add_argument("--cache_dir", default=None, help="Hugging Face cache folder (default: HF_HUB_CACHE).")
    hub.add_argument("--token", default=None, help="Hugging Face token for private repos (default: your login).")

    sample = commands.add_parser(
        "sample",
        parents=[hub],
        help="Write a PNG grid of samples, one row per class.",
        description="Write a PNG grid of samples, one row per class, each class from its own seeded noise.",
    )
    sample.add_argument("source", metavar="REPO_OR_FOLDER", help="A run folder or a Hub repo id 'user/name'.")
    sample.add_argument(
        "--classes",
        type=_int_list,
        default=None,
        help="Comma-separated class ids, one grid row each, e.g. 3,7 (default: every class of the loaded tasks).",
    )
    sample.add_argument(
        "--tasks",
        type=_name_list,
        default=None,
        help="Comma-separated tasks to load (default: the tasks owning --classes as the index says, else all).",
    )
    sample.add_argument("--output", type=Path, default=None, help="The PNG file to write (required).")
    sample.add_argument("--num_samples", type=_positive, default=8, help="Samples per class (grid columns).")
    sample.add_argument(
        "--num_inference_steps", type=_positive, default=20, help="Euler steps (UNet evaluations per sample)."
    )
    sample.add_argument("--seed", type=int, default=0, help="Seed of the per-class noise generators.")
    sample.add_argument(
        "--scale", type=_positive, default=None, help="Enlarge the grid this many times (default: to ~64 px a sample)."
    )
    sample.add_argument("--device", default=None, help="Device to sample on (default: cuda when available, else cpu).")
    # Earlier spellings, kept working.
    sample.add_argument("--out", dest="output", type=Path, help=argparse.SUPPRESS)
    sample.add_argument("-n", dest="num_samples", type=_positive, help=argparse.SUPPRESS)
    sample.add_argument("--steps", dest="num_inference_steps", type=_positive, help=argparse.SUPPRESS)

    download = commands.add_parser(
        "download",
        parents=[hub],
        help="Download the backbone and some tasks; print the folder.",
        description="Download the index, the backbone and the named tasks of a Hub repo; print the local folder.",
    )
    download.add_argument("source", metavar="REPO", help="Hub repo id 'user/name'.")
    download.add_argument("--tasks", type=_name_list, default=None, help="Comma-separated tasks (default: all).")
    download.add_argument("--local_dir", type=Path, default=None, help="Download into this folder, not the cache.")

    inspect = commands.add_parser(
        "inspect",
        parents=[hub],
        help="Plot what the adapters became: rank of F_y per layer, alpha and omega over classes.",
        description="Write rank.png (rank of F_y per adapted layer, mean and range over classes), alpha_omega.png "
        "(mean and std over classes of alpha_i and omega_i per layer) and diagnostics.json, and print a table.",
    )
    inspect.add_argument("source", metavar="REPO_OR_FOLDER", help="A run folder or a Hub repo id 'user/name'.")
    inspect.add_argument("--output_dir", type=Path, default=None, help="The folder to write the plots to (required).")
    inspect.add_argument(
        "--tasks", type=_name_list, default=None, help="Comma-separated tasks whose classes count (default: all)."
    )
    return parser


def _index_of(source: str, args: argparse.Namespace):
    from .hub import download_index
    from .run_folder import read_index

    if Path(source).is_dir():
        return read_index(source)
    return download_index(source, revision=args.revision, token=args.token, cache_dir=args.cache_dir)[1]


def _sample(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from .pipeline import FunLoRAPipeline, sample_grid
    from .run_folder import write_file_atomic

    if args.output is None:
        parser.error("--output is required: the PNG file to write, e.g. --output grid.png.")
    if args.output.suffix.lower() != ".png":
        parser.error(f"--output must name a .png file, got {str(args.output)!r}.")
    if args.output.is_dir():
        parser.error(f"--output {str(args.output)!r} is a folder; name a .png file, e.g. {args.output / 'grid.png'}.")
    tasks = args.tasks
    if tasks is None and args.classes is not None:
        index = _index_of(args.source, args)
        unknown = [c for c in args.classes if index.owner_of(c) is None]
        if unknown:
            known = sorted(c for task in index.tasks for c in task.class_ids)
            parser.error(f"--classes {unknown} belong to no task of {args.source}; its classes are {known}.")
        owners = {index.owner_of(c) for c in args.classes}
        tasks = [name for name in index.task_names if name in owners]
    pipe = FunLoRAPipeline.from_pretrained(
        args.source, tasks=tasks, revision=args.revision, token=args.token, cache_dir=args.cache_dir
    )
    pipe.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.set_progress_bar_config(disable=True)
    class_ids = args.classes if args.classes is not None else pipe.class_ids
    grid = sample_grid(
        pipe,
        class_ids,
        args.num_samples,
        seed=args.seed,
        num_inference_steps=args.num_inference_steps,
        scale=args.scale,
    )
    write_file_atomic(args.output, lambda tmp: grid.save(tmp, format="PNG"))
    print(f"{args.output}: classes {class_ids}, {args.num_samples} samples each, {grid.width}x{grid.height} pixels")
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


def _inspect(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .diagnostics import adapter_diagnostics, summary_table, write_diagnostics
    from .pipeline import FunLoRAPipeline

    if args.output_dir is None:
        parser.error("--output_dir is required: the folder to write the plots to, e.g. --output_dir plots/.")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output_dir {str(args.output_dir)!r} is a file; name a folder, e.g. plots/.")
    pipe = FunLoRAPipeline.from_pretrained(
        args.source, tasks=args.tasks, revision=args.revision, token=args.token, cache_dir=args.cache_dir
    )
    layers = adapter_diagnostics(pipe.unet)
    paths = write_diagnostics(layers, args.output_dir, title=f"rank of F_y: {args.source}")
    print(summary_table(layers), end="")
    print(f"wrote {', '.join(str(path) for path in paths)}")
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
        if args.command == "inspect":
            return _inspect(args, parser)
        return _download(args)
    except ValueError as err:
        # Loader errors name the problem and the fix already; show them without a traceback.
        parser.exit(2, f"funlora {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
