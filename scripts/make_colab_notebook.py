"""Writes experiments/colab_benchmark.ipynb from the cells below.

    python scripts/make_colab_notebook.py experiments/colab_benchmark.ipynb

(Editing the notebook in Jupyter works too; this keeps its source reviewable.)
"""
import sys
import nbformat

cells = []
def md(text):
  cells.append(nbformat.v4.new_markdown_cell(text.strip()))
def code(text, tags=()):
  cell = nbformat.v4.new_code_cell(text.strip())
  if tags:
    cell.metadata["tags"] = list(tags)
  cells.append(cell)

md("""
# ald_jax in Colab: install, benchmark, ALD vs LSTM

Actor-Learner Distillation in JAX: a GTrXL learner distilled into a small LSTM actor that
does all the acting. This notebook installs ald_jax as any package (one variable names
it), times the learner step on this runtime, then trains ALD and the LSTM baseline on a
small I-Maze with their progress in the cell, and shows a table and the curves. The
repository's recorded results are offered at the end.

Time: the install ~2 min; the benchmark and the two runs ~10 min on a CPU runtime
(Runtime → Change runtime type → GPU puts the learner on the GPU; the actors stay on the
CPU). Run all cells; after a restart, run them again: the install is skipped and finished
runs are not repeated.
""")
code('''
import os

# What to install: a git URL ("git+https://github.com/ORG/ald_jax.git", "@TAG" for a
# release) or a wheel's path or URL ("ald_jax-0.1.0-py3-none-any.whl").
PACKAGE = os.environ.get("ALD_JAX_PACKAGE",
                         "git+https://github.com/ORG/ald_jax.git")
# Where this notebook's runs and plots go.
OUT_DIR = os.path.abspath(os.environ.get("ALD_JAX_NOTEBOOK_OUT", "ald_jax_out"))
# Seconds-long settings (the test suite runs the notebook with them).
TINY = os.environ.get("ALD_JAX_NOTEBOOK_TINY", "0") == "1"
''', tags=["parameters"])
md("""
## Install

`pip install PACKAGE`, and on a GPU runtime the CUDA 12 build of the JAX version it
installed. Colab preinstalls a JAX that ald_jax may replace: if JAX was imported before
this cell, it asks for one restart; run all cells again afterwards (this cell then skips
the install).
""")
code('''
import importlib.metadata
import shutil
import subprocess
import sys

INSTALLED = os.path.join(OUT_DIR, "installed_from.txt")


def stream(cmd):
  """Runs cmd with its output shown in the cell as it comes."""
  print("$", " ".join(cmd), flush=True)
  with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True) as process:
    for line in process.stdout:
      print(line, end="", flush=True)
  if process.returncode != 0:
    raise RuntimeError(f"{cmd[0]} exited with {process.returncode}")


def installed_from():
  try:
    importlib.metadata.version("ald_jax")
  except importlib.metadata.PackageNotFoundError:
    return None
  if not os.path.exists(INSTALLED):
    return None
  with open(INSTALLED, encoding="utf-8") as f:
    return f.read()


if installed_from() == PACKAGE:
  print(f"ald_jax is installed from {PACKAGE}: nothing to do.")
else:
  jax_imported = "jax" in sys.modules
  stream([sys.executable, "-m", "pip", "install", "--progress-bar=off",
          PACKAGE])
  if shutil.which("nvidia-smi"):  # a GPU runtime
    jax_version = importlib.metadata.version("jax")
    stream([sys.executable, "-m", "pip", "install", "--progress-bar=off",
            f"jax[cuda12]=={jax_version}"])
  os.makedirs(OUT_DIR, exist_ok=True)
  with open(INSTALLED, "w", encoding="utf-8") as f:
    f.write(PACKAGE)
  if jax_imported:
    print("JAX was imported before the install: restart the runtime (Runtime -> "
          "Restart session), then run all cells again.")
''', tags=["install"])
code('''
import time

from IPython.display import Image, Markdown, display
import jax
import numpy as np

import ald_jax
from ald_jax import config, learner as learner_lib, metrics, plot

os.makedirs(OUT_DIR, exist_ok=True)
print(f"ald_jax {ald_jax.__version__} from {os.path.dirname(ald_jax.__file__)}")
print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPUs")


def table(rows):
  """A Markdown table of dicts (one row each)."""
  columns = list(dict.fromkeys(k for row in rows for k in row))
  text = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(text(row.get(c, "")) for c in columns) + " |"
            for row in rows]
  display(Markdown("\\n".join(lines)))
''')
md("""
## The learner step on this runtime

The ALD learner's combined update (RL loss on the GTrXL, distillation into the LSTM) on a
batch of random data: the compile time, then the warm step time and the frames it trains
per second.
""")
code('''
if TINY:
  SIZES = dict(unroll_length=4, learner_context=4, batch_size=2,
               gtrxl=config.GTrXLConfig(num_layers=1, d_model=16, num_heads=2,
                                        mlp_size=32, memory_length=4),
               lstm=config.LSTMConfig(hidden_size=16),
               torso=config.TorsoConfig(mlp_sizes=(16,)))
  STEPS = 3
else:  # the library's default sizes
  SIZES = {}
  STEPS = 30
bench_cfg = config.LearnerConfig(agent="ald", **SIZES)
learner = learner_lib.make_learner(bench_cfg, obs_shape=(10,), num_actions=4)
batch = learner.example_batch(bench_cfg.batch_size)
state = learner.init(jax.random.PRNGKey(0), batch)
start = time.perf_counter()
state, _ = learner.step(state, batch)
jax.block_until_ready(state)
compile_s = time.perf_counter() - start
start = time.perf_counter()
for i in range(STEPS):
  state, _ = learner.step(state, batch)
  jax.block_until_ready(state)
  print(f"step {i + 1}/{STEPS}", end="\\r", flush=True)
step_s = (time.perf_counter() - start) / STEPS
frames = bench_cfg.batch_size * bench_cfg.unroll_length
table([{"device": str(jax.devices()[0]), "compile_s": compile_s,
        "step_ms": 1e3 * step_s, "frames_per_s": frames / step_s}])
''')
md("""
## ALD vs the LSTM alone

Both agents on I-Maze (corridor 4): ALD's actor is the same LSTM as the `lstm` agent's,
but it learns from the GTrXL learner. Each run prints a progress line every few seconds
and writes a run directory under `OUT_DIR/runs` (config, metrics, checkpoints); a run
finished before a restart is not repeated.
""")
code('''
if TINY:
  AGENTS, BUDGET = ("ald", "lstm"), 300
  RUN_SIZES = dict(SIZES, unroll_length=8, learner_context=8, batch_size=2)
  SYSTEM = dict(num_actors=1, envs_per_actor=2, replay_capacity=16,
                queue_capacity=2, calibration_steps=5, eval_interval_s=0.0,
                report_interval_s=0.5)
else:
  AGENTS, BUDGET = ("ald", "lstm"), 150_000
  RUN_SIZES = dict(unroll_length=16, learner_context=16, batch_size=16,
                   gtrxl=config.GTrXLConfig(num_layers=2, d_model=64, num_heads=4,
                                            mlp_size=128, memory_length=16),
                   lstm=config.LSTMConfig(hidden_size=64),
                   torso=config.TorsoConfig(mlp_sizes=(64,)))
  SYSTEM = dict(num_actors=2, envs_per_actor=8, report_interval_s=10.0)
RUNS = {}
for agent in AGENTS:
  logdir = os.path.join(OUT_DIR, "runs", agent)
  started = os.path.isdir(os.path.join(logdir, "checkpoints"))
  cfg = config.TrainConfig(
      learner=config.LearnerConfig(agent=agent, **RUN_SIZES),
      env="imaze", env_kwargs=(("corridor_length", 4),),
      total_env_steps=BUDGET, t_actor_budget_ms=1000.0 if TINY else 10.0,
      logdir=logdir, resume=started, **SYSTEM)
  print(f"== {agent}: {BUDGET} env steps -> {logdir}", flush=True)
  RUNS[agent] = ald_jax.train(cfg).run_dir
''')
code('''
rows = []
for agent, run_dir in RUNS.items():
  last = metrics.read_metrics(run_dir)[-1]
  rows.append({"agent": agent, "env_steps": last.get("env_steps"),
               "wall_time_s": last.get("wall_time_s"),
               "episode_return": last.get("episode_return"),
               "success_rate": last.get("success_rate"),
               "t_actor_p50_us": last.get("t_actor_p50_us")})
table(rows)
curves = os.path.join(OUT_DIR, "ald_vs_lstm.png")
plot.plot_runs(list(RUNS.values()), curves)
display(Image(filename=curves))
''')
md("""
## Recorded results

The repository records every measured claim in `docs/results.md` (with its figures and
result files under `experiments/results/`). Set `SHOW_RECORDED = True` to fetch them
(a shallow clone of `PACKAGE` when it is a git URL) and show the headline figures here.
""")
code('''
RESULTS_DIR = os.environ.get("ALD_JAX_RESULTS_DIR", "")
SHOW_RECORDED = bool(RESULTS_DIR)
HEADLINE = (
    "paper_comparison_imaze12_defaults_2026-11-27_cpu2_imaze-corridor_length=12,"
    "wrong_reward=0.png",
    "paper_comparison_metafetch3_2026-11-26_cpu2_meta_fetch-grid_size=3,"
    "num_objects=3,time_limit=50.png")
if SHOW_RECORDED and not RESULTS_DIR:
  if not PACKAGE.startswith("git+"):
    raise ValueError("PACKAGE is not a git URL: set ALD_JAX_RESULTS_DIR to the "
                     "experiments/results folder of a checkout instead")
  url, _, ref = PACKAGE[len("git+"):].partition("@")
  clone = os.path.join(OUT_DIR, "repository")
  if not os.path.isdir(clone):
    stream(["git", "clone", "--depth=1", *(["--branch", ref] if ref else []),
            url, clone])
  RESULTS_DIR = os.path.join(clone, "experiments", "results")
if SHOW_RECORDED:
  for name in HEADLINE:
    display(Markdown(f"**{name}**"))
    display(Image(filename=os.path.join(RESULTS_DIR, name)))
else:
  print("Recorded results: docs/results.md in the repository; set "
        "SHOW_RECORDED = True above to show the headline figures here.")
''')

nb = nbformat.v4.new_notebook(cells=cells)
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                             "language": "python"}
nb.metadata["language_info"] = {"name": "python"}
nb.metadata["colab"] = {"provenance": []}
nbformat.write(nb, sys.argv[1])
