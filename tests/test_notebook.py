"""experiments/colab_benchmark.ipynb runs: executed with nbclient on tiny
settings (the cell tagged `install` removed, the checkout as its repository),
so a broken notebook fails the suite."""
import json
import os

import nbclient
import nbformat

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
NOTEBOOK = os.path.join(REPO_ROOT, "experiments", "colab_benchmark.ipynb")


def _tagged(cell, tag):
  return tag in cell.metadata.get("tags", [])


def _outputs(cell, kind):
  return [o for o in cell.get("outputs", []) if kind in o.get("data", {})]


def test_repository_url_is_set_in_the_first_code_cell_only():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert _tagged(code[0], "parameters") and "REPO_URL =" in code[0].source
  assert [c for c in code if "REPO_URL =" in c.source] == [code[0]]
  install = [c for c in code if _tagged(c, "install")]
  assert len(install) == 1 and "pip" in install[0].source


def test_notebook_runs_on_tiny_settings(tmp_path, monkeypatch):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  notebook.cells = [c for c in notebook.cells if not _tagged(c, "install")]
  out_dir = tmp_path / "out"
  monkeypatch.setenv("ALD_JAX_REPO_DIR", REPO_ROOT)
  monkeypatch.setenv("ALD_JAX_NOTEBOOK_OUT", str(out_dir))
  monkeypatch.setenv("ALD_JAX_NOTEBOOK_TINY", "1")
  # The kernel and the scripts it starts import this checkout's ald_jax.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  client = nbclient.NotebookClient(
      notebook, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError naming the failing cell

  # The kernel ran this interpreter and this checkout.
  assert any(REPO_ROOT in o.get("text", "") for c in notebook.cells
             for o in c.get("outputs", []) if o.get("output_type") == "stream")
  summary_path = out_dir / "results" / "colab_comparison_summary.json"
  summary = json.loads(summary_path.read_text())
  assert [(r["agent"], r["seed"]) for r in summary["runs"]] == [("lstm", 1)]
  assert (out_dir / "bench_envs.json").exists()
  # The summary's runs shown as a table, its plot as an image.
  last = notebook.cells[-1]
  tables = [o["data"]["text/markdown"] for o in _outputs(last, "text/markdown")]
  assert any("final_success" in t and "| lstm |" in t for t in tables)
  assert len(_outputs(last, "image/png")) == len(summary["plots"]) == 1
