"""The notebooks run top to bottom, and the outputs stored in them come from the current code.

Each notebook is executed with nbclient (the `python3` kernel of this environment) with the settings CI uses, which
are also those of the stored outputs: `FUNLORA_NOTEBOOK_FAST=1`, `HF_HUB_OFFLINE=1` (the Hub cells print that they
are skipped), in a temporary working folder. Then the stored notebook must match the executed one: the same cells,
executed once in order, and for every code cell the same outputs: the same kinds (text, markdown, pictures), the same
picture sizes and the same printed text up to the numbers in it (losses and scores may differ in their last digits
from one CPU to another). Text that is not a number, such as "identical: True", must match exactly.

Regenerate the stored outputs after changing a notebook or the code it shows (about 3 minutes on 1 CPU core):

```bash
python tests/test_notebooks.py                 # both notebooks
python tests/test_notebooks.py quickstart      # one of them
```
"""

from __future__ import annotations

import base64
import os
import re
import struct
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# name -> least number of pictures the notebook must show
EXPECTED_PICTURES = {"quickstart": 5, "continual_learning": 4}
CI_ENVIRONMENT = {
    "FUNLORA_NOTEBOOK_FAST": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "OMP_NUM_THREADS": "1",
}
NUMBER = re.compile(r"[-+]?\d[\d,]*(\.\d+)?([eE][-+]?\d+)?")


def execute(name: str, workdir: Path, timeout: int = 900):
    """Execute `notebooks/<name>.ipynb` in `workdir` with the CI settings; returns the executed notebook."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    saved = {key: os.environ.get(key) for key in [*CI_ENVIRONMENT, "FUNLORA_HUB_REPO"]}
    os.environ.update(CI_ENVIRONMENT)
    os.environ.pop("FUNLORA_HUB_REPO", None)
    try:
        client = NotebookClient(
            notebook,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(workdir)}},
            record_timing=False,
        )
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


def png_size(data: str) -> tuple[int, int]:
    """(width, height) of a base64 PNG, read from its IHDR chunk."""
    header = base64.b64decode(data[:64])
    return struct.unpack(">II", header[16:24])


def cell_signature(cell) -> list:
    """What a code cell showed, with numbers masked: consecutive stream chunks of one stream are joined (how a
    kernel splits a stream depends on timing), stderr is left out (library warnings vary between installs)."""
    signature = []
    for output in cell.get("outputs", []):
        kind = output["output_type"]
        if kind == "stream":
            if output["name"] == "stderr":
                continue
            text = NUMBER.sub("#", output["text"])
            if signature and signature[-1][0] == "stream":
                signature[-1] = ("stream", signature[-1][1] + text)
            else:
                signature.append(("stream", text))
        elif kind == "error":
            signature.append(("error", output["ename"], output["evalue"]))
        else:
            data = output.get("data", {})
            entry = [kind, sorted(data)]
            if "image/png" in data:
                entry.append(png_size(data["image/png"]))
            for mime in ("text/markdown", "text/plain"):
                if mime in data:
                    entry.append(NUMBER.sub("#", data[mime]))
            signature.append(tuple(map(str, entry)))
    return [tuple(map(str, item)) for item in signature]


def pictures(notebook) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def errors(notebook) -> list[str]:
    return [
        f"{output['ename']}: {output['evalue']}"
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output["output_type"] == "error"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED_PICTURES))
def test_notebook_runs_and_its_stored_outputs_are_current(name, tmp_path):
    stored = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(stored)
    executed = execute(name, tmp_path)

    assert errors(executed) == []
    assert pictures(executed) >= EXPECTED_PICTURES[name]

    # The stored notebook is an executed one: every code cell run once, in order, with its outputs and pictures.
    code = [cell for cell in stored.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "run top to bottom, once"
    assert errors(stored) == []
    assert pictures(stored) >= EXPECTED_PICTURES[name]
    assert not any(o.get("name") == "stderr" for cell in code for o in cell.outputs), "stored outputs show stderr"

    # ... and it is this code's run, with the CI settings.
    assert [c.source for c in stored.cells] == [c.source for c in executed.cells]
    executed_code = [cell for cell in executed.cells if cell.cell_type == "code"]
    for number, (old, new) in enumerate(zip(code, executed_code), start=1):
        assert cell_signature(old) == cell_signature(new), (
            f"{name}.ipynb code cell {number}: the stored outputs differ from a fresh run; regenerate them with "
            "`python tests/test_notebooks.py`"
        )
    assert "settings: CI (FUNLORA_NOTEBOOK_FAST=1)" in code[0].outputs[0]["text"]


def main(names: list[str]) -> None:
    """Execute the notebooks with the CI settings and store them with their outputs."""
    for name in names or sorted(EXPECTED_PICTURES):
        with tempfile.TemporaryDirectory() as workdir:
            notebook = execute(name, Path(workdir))
        if errors(notebook):
            raise SystemExit(f"{name}.ipynb failed: {errors(notebook)}")
        # Leave no stderr (e.g. a warning of one install) in the stored notebook.
        for cell in notebook.cells:
            if cell.cell_type == "code":
                cell.outputs = [o for o in cell.outputs if o.get("name") != "stderr"]
        nbformat.write(notebook, NOTEBOOKS / f"{name}.ipynb")
        print(f"wrote notebooks/{name}.ipynb ({pictures(notebook)} pictures)")


if __name__ == "__main__":
    main(sys.argv[1:])
