"""The example notebooks run top to bottom, and are committed without outputs.

Each notebook is executed with nbclient in a fresh ``python3`` kernel running this
interpreter, in a temporary working directory (nothing is written into the repository), with
``HF_HUB_OFFLINE=1``. The notebooks share the toy base model through the default toy cache:
the fixture below trains it once (if it is not cached yet) and every notebook loads it.
The quickstart and the custom restoration study run by default; the custom method is marked
``slow`` (``pytest -m slow tests/test_examples.py``). The check that every notebook is
committed clean always runs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = ("quickstart.ipynb", "custom_restoration.ipynb", "custom_method.ipynb")
CELL_TIMEOUT_S = 300
_RUNS = [
    "quickstart.ipynb",
    "custom_restoration.ipynb",
    # About 15 s: together with the other two it would make this file too slow for the
    # default run.
    pytest.param("custom_method.ipynb", marks=pytest.mark.slow),
]

# A cell prepended to each notebook in memory: the kernel must run this very interpreter (the
# venv's), or the notebook would test some other installation of the package.
_KERNEL_CHECK = f"""
import os, sys
assert os.path.realpath(sys.prefix) == {os.path.realpath(sys.prefix)!r}, sys.prefix
assert os.environ.get("HF_HUB_OFFLINE") == "1"
"""


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def toy_base_cached() -> None:
    """Trains the toy base model into the default cache once (a load when already cached)."""
    import unlearnlens as ul

    ul.toy.train_base(ul.toy.make_world(seed=0), progress=False)


def test_every_notebook_is_listed() -> None:
    found = sorted(p.name for p in EXAMPLES.glob("*.ipynb"))
    assert found == sorted(NOTEBOOKS)


def test_every_notebook_is_executed() -> None:
    ids = [p if isinstance(p, str) else p.values[0] for p in _RUNS]
    assert sorted(ids) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    markdown = [c for c in nb.cells if c.cell_type == "markdown"]
    assert code and markdown, "an example needs code and the text that explains it"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"{name}: code cell {i} has outputs; clear them"
        assert cell.execution_count is None, f"{name}: code cell {i} has an execution count"
        assert cell.source.strip(), f"{name}: code cell {i} is empty"


@pytest.mark.parametrize("name", _RUNS)
def test_notebook_runs(
    name: str, toy_base_cached: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # One thread per kernel: on a machine whose cores are all busy (other tests, other jobs),
    # several spinning OpenMP threads slow a notebook down tenfold.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    nb.cells.insert(0, nbformat.v4.new_code_cell(_KERNEL_CHECK))
    before = _snapshot(EXAMPLES)

    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the traceback, if any cell raises
    elapsed = time.perf_counter() - start
    sys.stderr.write(f"\n{name}: executed in {elapsed:.1f} s\n")

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == n_code + 1
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert errors == []
    assert all(c.execution_count is not None for c in code), "a cell did not run"
    for cell in code:
        if "plt.show()" in cell.source:  # every figure is drawn inline
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source
    assert _snapshot(EXAMPLES) == before, "running the notebook changed files under examples/"
