"""The README stays in sync with the code: the test command CI runs, the config table, the Python example."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from peft import PeftConfig

from funlora_peft import FunLoRAConfig

ROOT = Path(__file__).resolve().parents[1]
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
