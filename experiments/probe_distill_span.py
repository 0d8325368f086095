"""How far back can distillation teach the LSTM actor to remember?

A fixed teacher picks the cue's action at a decision step `span` steps after
the cue (uniform elsewhere); distill-only updates (the learner's replay path,
the window the library uses: the whole C + T row) train the actor. Prints one
JSON object per setting: the actor's agreement with the cue at the decision
step on held-out rows, every 250 updates. No environment, no RL: this
isolates what the distillation (window, step weighting, LSTM initialisation)
can carry.

    python experiments/probe_distill_span.py \\
        --settings='[{"span": 60, "context": 64, "forget_bias": 3.0}]'

Keys of a setting (defaults in DEFAULTS): span, context (C), unroll (T),
hidden, forget_bias, learning_rate, step_weighting, policy_cost, updates,
batch.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ald_jax import config as config_lib  # pylint: disable=wrong-import-position
from ald_jax import learner as learner_lib  # pylint: disable=wrong-import-position
from ald_jax import types  # pylint: disable=wrong-import-position

DEFAULTS = dict(span=30, context=32, unroll=16, hidden=64, forget_bias=1.0,
                learning_rate=1e-3, step_weighting="teacher_confidence",
                policy_cost=10.0, updates=2000, batch=32)
OBS_DIM, NUM_ACTIONS = 4, 2   # cue one-hot (2), decision flag, bias


def cue_rows(rng: np.random.Generator, rows: int, s: dict):
  """Rows of C + T + 1 steps starting an episode: the cue at q - span, the
  decision flag at q (inside the unroll); the teacher's logits favour the
  cue's action at q only."""
  context, unroll, span = s["context"], s["unroll"], s["span"]
  length = context + unroll + 1
  obs = np.zeros((rows, length, OBS_DIM), np.float32)
  cues = rng.integers(0, NUM_ACTIONS, rows)
  decisions = rng.integers(max(context, span), context + unroll, rows)
  obs[np.arange(rows), decisions - span, cues] = 1.0
  obs[np.arange(rows), decisions, 2] = 1.0
  obs[:, :, 3] = 1.0
  step_type = np.full((rows, length), types.MID, np.int32)
  step_type[:, 0] = types.FIRST
  teacher_logits = np.zeros((rows, unroll, NUM_ACTIONS), np.float32)
  teacher_logits[np.arange(rows), decisions - context, cues] = 4.0
  zeros = np.zeros((rows, s["hidden"]), np.float32)
  batch = types.Batch(
      observation=obs, action=np.zeros((rows, length), np.int32),
      reward=np.zeros((rows, length), np.float32),
      discount=np.ones((rows, length), np.float32), step_type=step_type,
      behaviour_logits=np.zeros((rows, length, NUM_ACTIONS), np.float32),
      actor_state=types.LSTMState(zeros, zeros))
  teacher = types.AgentOutput(teacher_logits,
                              np.zeros((rows, unroll), np.float32))
  return batch, teacher, cues, decisions


def probe(setting: dict) -> dict:
  s = dict(DEFAULTS, **setting)
  unknown = set(setting) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"unknown setting keys {sorted(unknown)}; known: "
                     f"{sorted(DEFAULTS)}")
  cfg = config_lib.LearnerConfig(
      agent="ald", unroll_length=s["unroll"], learner_context=s["context"],
      batch_size=s["batch"], torso=config_lib.TorsoConfig(mlp_sizes=(64,)),
      lstm=config_lib.LSTMConfig(hidden_size=s["hidden"],
                                 forget_bias=s["forget_bias"]),
      gtrxl=config_lib.GTrXLConfig(num_layers=1, d_model=16, num_heads=2,
                                   mlp_size=16,
                                   memory_length=s["context"]),
      distill=config_lib.DistillConfig(
          value_cost=0.0, policy_cost=s["policy_cost"],
          step_weighting=s["step_weighting"]),
      actor_optimizer=config_lib.OptimizerConfig(
          learning_rate=s["learning_rate"]))
  learner = learner_lib.make_learner(cfg, (OBS_DIM,), NUM_ACTIONS)
  rng = np.random.default_rng(0)
  state = learner.init(jax.random.PRNGKey(0), cue_rows(rng, s["batch"], s)[0])
  held_out, _, cues, decisions = cue_rows(np.random.default_rng(1), 256, s)
  curve, start = [], time.perf_counter()
  for update in range(1, s["updates"] + 1):
    rows, teacher, _, _ = cue_rows(rng, s["batch"], s)
    replay = learner_lib.Replay(rows=rows, teacher=teacher,
                                next=np.zeros((), np.int32),
                                size=np.asarray(s["batch"], np.int32))
    state, _ = learner.replay_distill_steps(state, replay, num_steps=1)
    if update % 250 == 0:
      logits = np.asarray(learner.actor_forward(state.actor_params,
                                                held_out).logits)
      chosen = logits[np.arange(256), decisions - s["context"]].argmax(-1)
      curve.append([update, float(np.mean(chosen == cues))])
  first = next((u for u, agreement in curve if agreement >= 0.95), None)
  return dict(s, agreement_curve=curve, updates_to_95=first,
              seconds=round(time.perf_counter() - start, 1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--settings", required=True,
                      help="JSON list of settings (see the module doc)")
  parser.add_argument("--out", default="", help="Also write the JSON here.")
  args = parser.parse_args()
  results = [probe(setting) for setting in json.loads(args.settings)]
  for result in results:
    print(json.dumps(result), flush=True)
  record = {"command": " ".join(["python"] + sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "machine": {"platform": platform.platform(),
                        "cpu_count": os.cpu_count(),
                        "devices": [str(d) for d in jax.devices()]},
            "jax": jax.__version__, "results": results}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(record, f, indent=1)


if __name__ == "__main__":
  main()
