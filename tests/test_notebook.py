"""experiments/colab_benchmark.ipynb runs, as a Colab user would run it.

The fast test executes it in this interpreter on tiny settings without its
`install` cell (the checkout on PYTHONPATH); the slow one executes the whole
notebook, install cell included, in a fresh virtualenv whose only ald_jax is
the one the install cell puts there from a file git URL of this checkout's
committed HEAD (`.ci/run` runs it as its own step: ~4-5 min on 2 cores).
"""
import os
import subprocess
import sys

import nbclient
import nbformat
import pytest

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
NOTEBOOK = os.path.join(REPO_ROOT, "experiments", "colab_benchmark.ipynb")
RESULTS = os.path.join(REPO_ROOT, "experiments", "results")


def _tagged(cell, tag):
  return tag in cell.metadata.get("tags", [])


def _outputs(notebook, kind):
  return [o["data"][kind] for c in notebook.cells for o in c.get("outputs", [])
          if kind in o.get("data", {})]


def _streams(notebook):
  return "".join(o.get("text", "") for c in notebook.cells
                 for o in c.get("outputs", []) if o.get("output_type") == "stream")


def test_the_package_is_named_once_and_progress_is_shown():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert _tagged(code[0], "parameters") and "PACKAGE = " in code[0].source
  assert [c for c in code if "PACKAGE = " in c.source] == [code[0]]
  install = [c for c in code if _tagged(c, "install")]
  assert len(install) == 1 and '"pip", "install"' in install[0].source
  assert "jax[cuda12]" in install[0].source
  # Progress reaches the cell: no subprocess output is swallowed.
  assert not any("capture_output" in c.source for c in code)
  # The recorded results come last, after the measurements.
  assert "SHOW_RECORDED" in code[-1].source


def _check_executed(notebook, out_dir):
  tables = _outputs(notebook, "text/markdown")
  assert any("frames_per_s" in t for t in tables)  # the learner-step table
  runs = [t for t in tables if "| ald |" in t and "| lstm |" in t]
  assert runs and "success_rate" in runs[0]
  streams = _streams(notebook)
  # Each run's progress lines reached the cell.
  assert "== ald" in streams and "== lstm" in streams and "| steps " in streams
  assert (out_dir / "ald_vs_lstm.png").exists()
  assert (out_dir / "runs" / "ald" / "config.json").exists()
  # The curves, then the two recorded headline figures.
  assert len(_outputs(notebook, "image/png")) == 3


def test_notebook_runs_on_tiny_settings(tmp_path, monkeypatch):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  notebook.cells = [c for c in notebook.cells if not _tagged(c, "install")]
  out_dir = tmp_path / "out"
  monkeypatch.setenv("ALD_JAX_NOTEBOOK_OUT", str(out_dir))
  monkeypatch.setenv("ALD_JAX_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("ALD_JAX_RESULTS_DIR", RESULTS)
  monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
  # The kernel imports this checkout's ald_jax.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  client = nbclient.NotebookClient(
      notebook, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError naming the failing cell
  assert REPO_ROOT in _streams(notebook)  # this checkout ran
  _check_executed(notebook, out_dir)


def _sh(*cmd, **kwargs):
  subprocess.run(cmd, check=True, capture_output=True, text=True,
                 timeout=900, **kwargs)


@pytest.mark.slow
def test_whole_notebook_installs_and_runs_in_a_fresh_virtualenv(
    tmp_path, monkeypatch):
  venv = tmp_path / "venv"
  _sh(sys.executable, "-m", "venv", str(venv))
  python = str(venv / "bin" / "python")
  # What Colab has before the notebook: a Python with a Jupyter kernel.
  _sh(python, "-m", "pip", "install", "--quiet", "-c",
      os.path.join(REPO_ROOT, "constraints.txt"), "ipykernel")
  kernels = tmp_path / "jupyter" / "kernels" / "fresh"
  kernels.mkdir(parents=True)
  (kernels / "kernel.json").write_text(
      '{"argv": ["%s", "-m", "ipykernel_launcher", "-f", "{connection_file}"],'
      ' "display_name": "fresh", "language": "python"}' % python)
  out_dir = tmp_path / "out"
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("ALD_JAX_PACKAGE", f"git+file://{REPO_ROOT}")
  monkeypatch.setenv("PIP_CONSTRAINT", os.path.join(REPO_ROOT,
                                                    "constraints.txt"))
  monkeypatch.setenv("ALD_JAX_NOTEBOOK_OUT", str(out_dir))
  monkeypatch.setenv("ALD_JAX_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("ALD_JAX_RESULTS_DIR", RESULTS)
  monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
  monkeypatch.delenv("PYTHONPATH", raising=False)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(
      notebook, timeout=900, kernel_name="fresh",
      resources={"metadata": {"path": str(tmp_path)}}).execute()
  streams = _streams(notebook)
  assert f"from {venv}" in streams  # the installed package ran, not ours
  _check_executed(notebook, out_dir)
  # Restart-safe: after a restart the install cell installs nothing.
  again = nbformat.read(NOTEBOOK, as_version=4)
  again.cells = [c for c in again.cells if _tagged(c, "parameters")
                 or _tagged(c, "install")]
  nbclient.NotebookClient(
      again, timeout=300, kernel_name="fresh",
      resources={"metadata": {"path": str(tmp_path)}}).execute()
  assert "nothing to do" in _streams(again)
