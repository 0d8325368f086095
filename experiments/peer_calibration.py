"""Scales issue 7's peer figure to this machine.

Issue 7 measured, side by side on one machine, a public Flax gated
Transformer-XL at 1,406 trained frames/s and our GTrXL network of that time
(commit a4d1159) at 981 on the same workload. The peer is not part of this
repository, so to compare with it on another machine we rerun that old
network here: peer_here ~= 1,406 * (old network here / 981).

The workload, at the peer's shape (4 layers, d=256, 8 heads, mlp 256, M=64,
T=64, B=16, vector observations of 36, 4 actions): forward + backward + Adam
of the GTrXL policy-value network re-reading M context steps (M + T
positions, gradients through the last T), a cross-entropy policy loss and a
squared value loss; trained T-step frames per second. It uses only the API
that the old and the current networks share, so it runs on either checkout:

    git worktree add /tmp/issue7 a4d1159
    (cd /tmp/issue7 && PYTHONPATH=$PWD python /path/to/experiments/peer_calibration.py)
    python experiments/peer_calibration.py        # this checkout, same workload

Prints one JSON object with the command, the checkout measured and
`recompute_frames_per_s` (median of --steps timed steps after one compile).
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ald_jax
from ald_jax import config as config_lib
from ald_jax.networks import policy_value
from ald_jax.types import MID

BATCH, UNROLL, MEMORY, OBS_SIZE, NUM_ACTIONS = 16, 64, 64, 36, 4


def measure(num_steps: int) -> float:
  gtrxl = config_lib.GTrXLConfig(num_layers=4, d_model=256, num_heads=8,
                                 mlp_size=256, memory_length=MEMORY)
  net = policy_value.GTrXLPolicyValueNet(config_lib.TorsoConfig(), gtrxl,
                                         NUM_ACTIONS, 1)
  rng = np.random.default_rng(0)
  length = MEMORY + UNROLL
  obs = jnp.asarray(rng.normal(size=(BATCH, length, OBS_SIZE)), jnp.float32)
  step_type = jnp.full((BATCH, length), MID, jnp.int32)
  actions = jnp.asarray(rng.integers(NUM_ACTIONS, size=(BATCH, UNROLL)))
  returns = jnp.asarray(rng.normal(size=(BATCH, UNROLL)), jnp.float32)
  optimizer = optax.adam(3e-4)

  def loss_fn(params):
    out = net.apply(params, obs, step_type, MEMORY)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        out.logits[:, -UNROLL:], actions)
    return jnp.mean(ce) + 0.5 * jnp.mean(
        jnp.square(out.value[:, -UNROLL:] - returns))

  @jax.jit
  def train(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = net.init(jax.random.PRNGKey(0), obs, step_type)
  opt_state = optimizer.init(params)
  params, opt_state, loss = train(params, opt_state)   # compile
  jax.block_until_ready(loss)
  times = []
  for _ in range(num_steps):
    start = time.perf_counter()
    params, opt_state, loss = train(params, opt_state)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
  return BATCH * UNROLL / float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  print(json.dumps({
      "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "machine": f"{platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} cores",
      "device": str(jax.devices()[0]),
      "checkout": os.path.dirname(os.path.dirname(ald_jax.__file__)),
      "recompute_frames_per_s": round(measure(args.steps), 1),
  }))


if __name__ == "__main__":
  main()
