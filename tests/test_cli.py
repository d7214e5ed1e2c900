"""examples/sample.py, and the shell commands of README.md and examples/README.md run as written.

Rule for the commands: every ```bash block of the two READMEs is preceded by an HTML comment saying what the tests do
with it: `<!-- test: run -->` (the test below runs the block, as written, with bash, in a fresh folder holding the
repository's `examples/`, one block after the other, so a later block can use what an earlier one wrote), or
`<!-- test: skip, REASON -->` (too slow, or needs the network, a GPU or a Hub token). A block without either fails the
test, so a new command is never silently left untested.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_example
from PIL import Image
from test_hub import REPO, hub, run_source  # noqa: F401  (fixtures: a fake Hub holding a pushed 3-task run)
from test_pipeline import make_run

from funlora_peft import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "examples" / "README.md"]
MARKER = re.compile(r"<!-- test: (run|skip, [^>]+?) -->\n```bash\n(.*?)\n```", re.S)


def load_script(path: Path):
    return load_example(path.stem)


def grid_size(rows: int, cols: int, side: int = 8, scale: int = 4) -> tuple[int, int]:
    """Size of a `make_image_grid` picture (1-pixel padding) of rows x cols images of side x side."""
    return ((cols * (side + 1) + 1) * scale, (rows * (side + 1) + 1) * scale)


# --------------------------------------------------------------------------------------------------------------------
# funlora sample
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    make_run(folder)  # tasks task_0 [0, 1], task_2 [2, 3], task_2 [4]; 8x8 images
    return folder


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


def documented_blocks() -> list[tuple[str, str, str]]:
    """(file, marker, commands) of every marked ```bash block, in order; fails on an unmarked one."""
    blocks = []
    for doc in DOCS:
        text = doc.read_text()
        unmarked = len(re.findall(r"```bash\n", text)) - len(MARKER.findall(text))
        assert unmarked == 0, f"{doc.relative_to(ROOT)}: {unmarked} ```bash block(s) without a test marker"
        blocks += [(str(doc.relative_to(ROOT)), marker, commands) for marker, commands in MARKER.findall(text)]
    return blocks


def test_every_documented_command_is_marked():
    blocks = documented_blocks()
    assert {name for name, _, _ in blocks} == {str(doc.relative_to(ROOT)) for doc in DOCS}
    assert any(marker == "run" for _, marker, _ in blocks)


def documented_commands() -> list[tuple[str, list[str]]]:
    """(file, argv) of every command of every marked block: continuation lines joined, comments dropped, `&&` split."""
    commands = []
    for name, _, block in documented_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv:
                    commands.append((name, argv))
    return commands


def test_every_documented_script_command_parses():
    """The slow commands are not run, but their flags must exist: each is parsed by its script's own parser."""
    parsed = set()
    for name, argv in documented_commands():
        scripts = [i for i, token in enumerate(argv) if re.fullmatch(r"examples/\w+\.py", token)]
        if scripts and "cuda" in argv and not torch.cuda.is_available():
            continue  # a GPU command: its parser checks that the device exists
        if scripts:
            script = argv[scripts[0]]
            module = load_script(ROOT / script)
            try:
                module.parse_args(argv[scripts[0] + 1 :])
            except SystemExit as error:
                raise AssertionError(f"{name}: {' '.join(argv)} does not parse ({error})") from None
            parsed.add(script)
        elif argv[0] == "funlora":
            cli.build_parser().parse_args(argv[1:])
            parsed.add("funlora")
    assert {"examples/train.py", "examples/benchmark_adapter.py", "funlora"} <= parsed


@pytest.mark.slow
def test_documented_fast_commands_run_as_written(tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    bin_dir = str(Path(sys.executable).parent)  # `python`, `accelerate` and `funlora` of this environment
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    ran = 0
    for name, marker, commands in documented_blocks():
        if marker != "run":
            continue
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", commands],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{name}:\n{commands}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        ran += 1
    assert ran >= 1
    pictures = sorted(tmp_path.rglob("*.png"))
    assert pictures, "the documented fast commands write sample grids"
