"""The Python API in a real Jupyter kernel (issue 49): docs/notebook.ipynb runs train ->
predict -> explain -> the report inline, every cell without error, and the outputs a
notebook shows are there (a table, a figure, the report's HTML)."""

import os

import pytest

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(CHECKOUT, "docs", "notebook.ipynb")


@pytest.mark.slow
def test_the_notebook_runs_in_a_jupyter_kernel(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("NOTEBOOK_WORKDIR", str(tmp_path))
    # The kernel imports the package from the checkout, as `pip install -e .` gives it.
    monkeypatch.setenv("PYTHONPATH", CHECKOUT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    data = [o.get("data", {}) for o in outputs]
    assert any("text/html" in d and "<table" in d["text/html"] for d in data)  # predictions
    assert any("image/png" in d for d in data)                                # the heatmap
    assert any("text/html" in d and "<iframe" in d["text/html"] for d in data)  # the report
    assert (tmp_path / "run" / "report.html").is_file()
    # Nothing printed per batch: the run's progress is a handful of lines, not hundreds.
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert text.count("\n") < 200, text[-2000:]
