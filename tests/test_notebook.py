"""examples/tour.ipynb, the notebook a researcher opens first, runs from top to bottom in a real Jupyter
kernel — this very interpreter, through a kernel spec written for it, so that neither a user-level
``python3`` kernel nor ``python`` on PATH can stand in — and is committed without outputs."""

import sys
from pathlib import Path

import nbformat
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "tour.ipynb"
CELL_TIMEOUT_S = 120


def code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def this_interpreter_kernel(root: Path) -> KernelManager:
    """A kernel manager that can only start ``sys.executable -m ipykernel_launcher``."""
    write_kernel_spec(str(root / "kernels" / "this-python"))
    specs = KernelSpecManager(kernel_dirs=[str(root / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="this-python", kernel_spec_manager=specs)


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cells = code_cells(nb)
    assert cells
    assert all(cell.outputs == [] and cell.execution_count is None for cell in cells)


def test_notebook_runs_top_to_bottom_in_a_jupyter_kernel(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        nb, km=this_interpreter_kernel(tmp_path), timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError at the first cell that fails
    outputs = [output for cell in code_cells(nb) for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert nb.cells[-1].outputs[0].text.strip() == sys.executable
    shown = [o.data for o in outputs if o.output_type in ("execute_result", "display_data")]
    figures = [data for data in shown if "image/png" in data]
    assert len(figures) == 3  # the sweep, the contributions and one row's token strip
    tables = "\n".join(data.get("text/plain", "") for data in shown)
    for heading in ("ProbeResult", "SweepResult", "Contributions", "EntropyChange"):
        assert heading in tables
