"""The READMEs stay in sync with the code: the test command CI runs, the config table, the Python example, and the
shell commands of README.md and examples/README.md run as written.

Rule for the commands: every ```bash block of the two READMEs is preceded by an HTML comment saying what the tests do
with it: `<!-- test: run -->` (the test below runs the block, as written, with bash, in a fresh folder holding the
repository's `examples/`, one block after the other, so a later block can use what an earlier one wrote), or
`<!-- test: skip, REASON -->` (too slow, or needs the network, a GPU or a Hub token). A block without either fails the
test, so a new command is never silently left untested.
"""

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load_example
from peft import PeftConfig

from funlora_peft import FunLoRAConfig, cli

README = (ROOT / "README.md").read_text()


def config_table() -> str:
    """The markdown table of FunLoRAConfig's own fields, from their `metadata["help"]`."""
    base = {f.name for f in dataclasses.fields(PeftConfig)}
    rows = ["| field | default | help |", "|---|---|---|"]
    for f in dataclasses.fields(FunLoRAConfig):
        if f.name in base:
            continue
        default = "required" if f.name == "class_ids" else repr(f.default)
        rows.append(f"| `{f.name}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)


def test_config_table_matches_the_dataclass():
    assert config_table() in README, "regenerate the README table with tests/test_readme.config_table()"


def test_ci_runs_the_readme_test_command():
    command = re.search(r"Run the tests.*?```bash\n(.*?)\n```", README, re.S).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text()


def test_python_example_runs(tmp_path):
    code = re.search(r"## Python in 15 lines\n\n```python\n(.*?)```", README, re.S).group(1)
    assert len(code.strip().splitlines()) <= 16
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    assert (tmp_path / "adapters" / "task_1" / "adapter_model.safetensors").is_file()


DOCS = [ROOT / "README.md", ROOT / "examples" / "README.md"]


MARKER = re.compile(r"<!-- test: (run|skip, [^>]+?) -->\n```bash\n(.*?)\n```", re.S)


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
            module = load_example(Path(script).stem)
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


def test_pipeline_example_runs(tmp_path, run_folder):
    code = re.search(r"## Pipelines: from components, saved and loaded again\n.*?```python\n(.*?)```", README, re.S)
    (tmp_path / "runs").mkdir()
    run_folder.rename(tmp_path / "runs" / "digits")
    check = "\nassert again.labels == pipe.labels and type(again.scheduler) is type(heun.scheduler)\n"
    subprocess.run([sys.executable, "-c", code.group(1) + check], cwd=tmp_path, check=True)
    assert (tmp_path / "runs" / "digits-heun" / "scheduler" / "scheduler_config.json").is_file()
