"""Executes every ``notebooks/*.ipynb`` (the math notebooks) in a fresh kernel.

Each notebook derives its equations in markdown and then asserts them against jaxdiff, so a
failing ``assert`` / ``np.testing`` call inside a notebook fails that notebook's test here.
The kernel is ``python3`` started with this interpreter (jupyter_client replaces the spec's
``python`` with ``sys.executable``; :func:`test_kernel_is_this_interpreter` checks it), with
``MPLBACKEND=Agg`` (no display) and ``JAX_PLATFORMS=cpu``.
"""

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


@pytest.fixture
def kernel_env(monkeypatch):
    """The environment the kernel inherits: headless matplotlib, JAX on CPU, this checkout first
    on the path (so the notebooks import this jaxdiff even without ``pip install -e``)."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets ipykernel's debugger
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + path if path else ""))


def execute(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Runs every cell in a new ``python3`` kernel, cwd ``notebooks/``; raises
    ``nbclient.exceptions.CellExecutionError`` (with the cell's traceback) on the first error."""
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    return client.execute()


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


def test_kernel_is_this_interpreter(kernel_env):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import os, sys\nprint(sys.executable)\nprint(os.environ['MPLBACKEND'])\n"
            "print(os.environ['JAX_PLATFORMS'])"
        )
    ]
    out = execute(nb).cells[0].outputs
    text = "".join(o.get("text", "") for o in out if o.output_type == "stream").split()
    assert text == [sys.executable, "Agg", "cpu"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_without_outputs(path):
    """Notebooks are committed cleared, so that their diffs show only the source."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: clear the outputs of cells {dirty}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, kernel_env):
    execute(nbformat.read(path, as_version=4))
