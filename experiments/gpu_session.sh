#!/usr/bin/env bash
# What ran on a lent GPU machine (one H100/H200, 16 CPU cores, no network),
# recorded so the figures in experiments/results/*_h200* can be reproduced.
#
#   bash experiments/gpu_session.sh check   # versions, a short run, learner benchmarks, GPU tests
#   bash experiments/gpu_session.sh bench   # versions, learner-step benchmarks, a GPU test
#   bash experiments/gpu_session.sh system  # versions, end-to-end ALD vs transformer, cached vs recompute
#   bash experiments/gpu_session.sh grid    # memory-span grid: 8 runs at a time, 2 pinned cores each
#   bash experiments/gpu_session.sh wallclock  # the learner loop's device-busy share and ALD vs
#                                              # transformer end to end, local actor processes (no Ray)
#
# The machine's image has jax/flax/optax/chex/orbax; the few missing wheels
# (dm-env, dm-tree, tensorboardX; attrs, wrapt and pytest's xdist and
# timeout plugins only if its Python lacks them) travel in .whl/ (git-ignored:
# pass it in the run's carry). Make them here, on the machine with the
# registries, before the first device call:
#
#   bash experiments/gpu_session.sh wheels  # ~1.6 MB, Python 3.11-3.13
#
# Ray (80 MB) does not fit the transfer limit: runs use actor threads or the
# local actor processes (--actors=processes, standard library only).
# Outputs go to $OUT.
set -u
if [ "${1:-}" = wheels ]; then
  rm -rf .whl
  for version in 3.11 3.12 3.13; do
    python3 -m pip download -q --only-binary=:all: --no-deps \
      --python-version "$version" --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 -d .whl dm-tree==0.1.10 wrapt || exit 1
  done
  python3 -m pip download -q --no-deps -d .whl dm-env==1.6 \
    tensorboardX==2.6.5 attrs pytest-xdist execnet pytest-timeout || exit 1
  ls .whl; exit 0
fi
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
ls .whl/dm_env-*.whl > /dev/null || {
  echo "no .whl/: run 'bash experiments/gpu_session.sh wheels' here first and carry .whl"
  exit 1; }
install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site "$@" || exit 1
}
install .whl/dm_env-*.whl .whl/tensorboardx-*.whl \
  "$(ls .whl/dm_tree-*.whl | grep "cp$(python3 -c 'import sys; print("%d%d" % sys.version_info[:2])')-")"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# dm-tree needs attrs and wrapt: take ours only where the image lacks them.
python3 -c "import attrs, wrapt" 2> /dev/null || install .whl/attrs-*.whl \
  "$(ls .whl/wrapt-*.whl | grep "cp$(python3 -c 'import sys; print("%d%d" % sys.version_info[:2])')-")"
python3 -c "import tree, dm_env, tensorboardX" || exit 1
# The GPU tests run on pytest's workers (-n) under its timeout plugin.
python3 -c "import xdist, pytest_timeout" 2> /dev/null || install \
  .whl/pytest_xdist-*.whl .whl/execnet-*.whl .whl/pytest_timeout-*.whl
export XLA_PYTHON_CLIENT_PREALLOCATE=false RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
START=$(date +%s)

# Small sizes (the ones of the CPU grids in experiments/results/).
SMALL="--gtrxl_num_layers=2 --gtrxl_d_model=64 --gtrxl_mlp_size=128
  --lstm_hidden_size=64 --torso_mlp_sizes=64 --unroll_length=16
  --report_interval_s=5 --notensorboard --actors=threads --t_actor_policy=warn"

versions() {
  python3 -c "import sys, jax, flax, optax, chex, orbax.checkpoint as o, numpy
print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__,
      'optax', optax.__version__, 'chex', chex.__version__, 'numpy', numpy.__version__)
print(jax.devices())" 2>&1 | tee "$OUT/versions.txt"
  nvidia-smi -L >> "$OUT/versions.txt"; nproc >> "$OUT/versions.txt"
}

check() {
  versions
  timeout 100 python3 -m ald_jax.train $SMALL --gtrxl_memory_length=32 \
    --learner_context=32 --total_env_steps=20000 --logdir=/tmp/smoke_run \
    > "$OUT/smoke_run.log" 2>&1; echo "smoke run rc=$?" | tee -a "$OUT/smoke_run.log"
  tail -5 "$OUT/smoke_run.log"
  timeout 90 python3 experiments/bench_learner_step.py --iters 500 \
    > "$OUT/bench_learner_step_default.json" 2> "$OUT/bench_default.err"
  echo "bench default rc=$?"
  timeout 90 python3 experiments/bench_learner_step.py --shape=large \
    > "$OUT/bench_learner_step_large.json" 2> "$OUT/bench_large.err"
  echo "bench large rc=$?"
  timeout 100 python3 -m pytest -q -x -n 8 -p no:cacheprovider \
    tests/test_learner_memory.py tests/test_networks_gtrxl.py \
    > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
  echo "check took $(( $(date +%s) - START )) s"
}

# Seconds left before $BENCH_SECONDS (default 560) have passed, capped at $1.
left() {
  local rest=$(( START + ${BENCH_SECONDS:-560} - $(date +%s) ))
  [ "$rest" -lt "$1" ] && echo "$rest" || echo "$1"
}

# Learner-step benchmarks one after another (never two on the GPU at once),
# then the GPU test. Each echoes its figures to stderr as they come, so one cut
# by its time limit keeps them. ~6 minutes.
bench() {
  versions
  timeout "$(left 170)" python3 experiments/bench_learner_step.py --iters 300 \
    --learner_steps 20 > "$OUT/bench_learner_step_default.json" \
    2> "$OUT/bench_learner_step_default.err"
  echo "bench_learner_step default rc=$? at $(( $(date +%s) - START )) s"
  timeout "$(left 190)" python3 experiments/bench_learner_step.py \
    --shape=large --learner_steps 10 > "$OUT/bench_learner_step_large.json" \
    2> "$OUT/bench_learner_step_large.err"
  echo "bench_learner_step large rc=$? at $(( $(date +%s) - START )) s"
  timeout "$(left 90)" python3 experiments/bench_learner_step.py \
    --only=driver --learner_steps 50 > "$OUT/bench_learner_step_driver.json" \
    2> "$OUT/bench_learner_step_driver.err"
  echo "bench_learner_step driver rc=$? at $(( $(date +%s) - START )) s"
  timeout "$(left 50)" python3 -m pytest -q -p no:cacheprovider \
    tests/test_networks_gtrxl.py -k step_form_matches_sequence_form \
    > "$OUT/gpu_test.log" 2>&1
  echo "gpu test rc=$?"; tail -2 "$OUT/gpu_test.log"
  grep -h '^{' "$OUT"/*.err | cut -c1-300
  echo "bench took $(( $(date +%s) - START )) s"
}

# End to end: ALD and the transformer agent with segment memory, then ALD
# re-reading its context. ALD at 1 distill-only step per RL step, as in issue
# 7's goal and the 11-26 H200 record. Each agent runs seconds_per_agent + 60 s
# (start-up, compile) whatever happens, so the limits leave ~30 s more.
# ~7 minutes.
# 15 minutes of device time (start-ups included) fit one of bench/system/grid.
system() {
  versions
  timeout "$(left 300)" python3 experiments/bench_system.py \
    --agents=ald,transformer --seconds_per_agent=60 --alone_calls=2000 \
    --ald_distill_steps=1 --learner_memory=cached \
    --out="$OUT/bench_system_cached.json" \
    > /dev/null 2> "$OUT/bench_system_cached.err"
  echo "bench_system cached rc=$? at $(( $(date +%s) - START )) s"
  timeout "$(left 150)" python3 experiments/bench_system.py \
    --agents=ald --seconds_per_agent=60 --alone_calls=2000 \
    --ald_distill_steps=1 --learner_memory=recompute \
    --out="$OUT/bench_system_recompute.json" \
    > /dev/null 2> "$OUT/bench_system_recompute.err"
  echo "bench_system recompute rc=$? at $(( $(date +%s) - START )) s"
  grep -h '^{' "$OUT"/*.err | cut -c1-300
}

# Wall-clock (issue: ALD saves wall-clock): bench_loop with 14 local actor
# processes beside the loop, then ALD and the transformer agent end to end
# with 14 actor processes x 16 envs, at the default and the large shape (ALD
# at 1 distill-only step per RL step, then at training's 4 at the large
# shape if time is left). One call: ~11 minutes; each part is cut by the
# time left, and echoes its JSON to stderr as it comes.
wallclock() {
  versions
  local procs="--actors=processes --num_actors=14 --envs_per_actor=16"
  timeout "$(left 90)" python3 experiments/bench_loop.py $procs --seconds=10 \
    --distill_ms=3 --out="$OUT/bench_loop_processes.json" \
    > /dev/null 2> "$OUT/bench_loop_processes.err"
  echo "bench_loop rc=$? at $(( $(date +%s) - START )) s"
  local preset
  for preset in default large; do
    timeout "$(left 200)" python3 experiments/bench_system.py $procs \
      --agents=ald,transformer --preset=$preset --seconds_per_agent=40 \
      --alone_calls=2000 --ald_distill_steps=1 \
      --out="$OUT/bench_system_processes_$preset.json" \
      > /dev/null 2> "$OUT/bench_system_processes_$preset.err"
    echo "bench_system $preset rc=$? at $(( $(date +%s) - START )) s"
  done
  timeout "$(left 100)" python3 experiments/bench_system.py $procs \
    --agents=ald --preset=large --seconds_per_agent=40 --alone_calls=2000 \
    --out="$OUT/bench_system_processes_large_ald4.json" \
    > /dev/null 2> "$OUT/bench_system_processes_large_ald4.err"
  echo "bench_system large ald ratio 4 rc=$? at $(( $(date +%s) - START )) s"
  grep -h '^{' "$OUT"/*.err | cut -c1-400
}

# One grid slot: runs its jobs one after another on cores $1,$1+1.
slot() {
  local core=$1; shift
  local job
  for job in "$@"; do
    local left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -gt 30 ] || break
    # shellcheck disable=SC2086
    timeout "$left" taskset -c "$core,$((core + 1))" python3 \
      experiments/paper_comparison.py $job --results_dir="/tmp/grid_results/$core" \
      >> "/tmp/grid_logs/slot$core.log" 2>&1
  done
}

grid() {
  DEADLINE=$(( START + ${GRID_SECONDS:-400} ))
  mkdir -p /tmp/grid_logs /tmp/grid_results
  local short="--env=cue_recall $SMALL --gtrxl_memory_length=32 --learner_context=32
    --total_env_steps=400000 --grid_dir=/tmp/grid/span_short --name=span_short"
  local long="--env=cue_recall --env_kwargs_grid=span=64 $SMALL
    --gtrxl_memory_length=64 --learner_context=64 --total_env_steps=500000
    --grid_dir=/tmp/grid/span64 --name=span64"
  local a s jobs=()
  for s in 1 2 3; do
    for a in ald transformer asymmetric lstm; do
      jobs+=("$long --agents=$a --seeds=$s")
    done
  done
  for s in 1 2 3; do
    for span in 16 32; do
      jobs+=("$short --env_kwargs_grid=span=$span --agents=ald --seeds=$s")
    done
  done
  # 18 jobs over 8 slots, the span-64 runs (longer) spread first.
  slot 0 "${jobs[0]}" "${jobs[4]}" &
  slot 2 "${jobs[1]}" "${jobs[5]}" &
  slot 4 "${jobs[2]}" "${jobs[6]}" &
  slot 6 "${jobs[3]}" "${jobs[7]}" &
  slot 8 "${jobs[8]}" "${jobs[12]}" "${jobs[13]}" &
  slot 10 "${jobs[9]}" "${jobs[14]}" "${jobs[15]}" &
  slot 12 "${jobs[10]}" "${jobs[16]}" &
  slot 14 "${jobs[11]}" "${jobs[17]}" &
  wait
  echo "grid took $(( $(date +%s) - START )) s"
  # Metrics and per-run JSON only (checkpoints stay behind).
  tar -czf "$OUT/grid.tgz" --exclude='checkpoints' --exclude='*.png' \
    -C /tmp grid grid_logs
  ls -la "$OUT"
  grep -h "reached\|Error\|error" /tmp/grid_logs/*.log | tail -30
}

"$@"
