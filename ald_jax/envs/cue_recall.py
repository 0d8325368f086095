"""Cue Recall: a memory task whose cue-to-decision distance is one keyword.

Timeline of one episode (t counts the actions taken so far)::

    t = 0         FIRST: the cue is shown (one-hot over `num_cues`)
    t = 1..span-1 MID:   the cue part is all zeros (the delay)
    t = span      MID:   the decision flag is 1; the action taken now is the
                         decision
    t = span + 1  LAST:  `correct_reward` if the decision equals the cue,
                         else `wrong_reward`; termination (discount 0)

So the cue is seen exactly `span` steps before the decision is asked for,
every episode takes exactly `span + 1` actions (`BatchedEnv`'s
`episode_length`) and has `span + 2` timesteps (FIRST included). Actions
before the decision pay 0 and change nothing.

Observation: a float32 vector of size `num_cues + 2 + num_distractors`:
[cue one-hot (only at t = 0) | decision flag (only at t = span) | phase
t / (span + 1) | distractors]. The phase depends on t alone, so it tells the
agent how far the decision is without leaking the cue. Distractors
(default none) are fresh uniform [0, 1) noise every step, drawn from the
episode's generator: inputs the memory must learn to ignore.

Why memory is needed: every observation after t = 0 has the same
distribution for every cue, so a memoryless policy decides independently of
the cue and succeeds in 1 / `num_cues` of the episodes (50% at the default 2),
while an agent that holds the cue for `span` steps succeeds in all of them.
"""
from __future__ import annotations

import dm_env
from dm_env import specs
import numpy as np

from ald_jax.envs import arguments

DEFAULT_SPAN = 16
DEFAULT_NUM_CUES = 2


class CueRecall(dm_env.Environment):
  """Cue Recall; see the module docstring for the timeline and observation.

  Success protocol: `episode_success()` returns True when the last episode's
  decision matched the cue, False when it did not, None while one is running.
  """

  def __init__(self,
               seed: int = 0,
               span: int = DEFAULT_SPAN,
               num_cues: int = DEFAULT_NUM_CUES,
               correct_reward: float = 1.0,
               wrong_reward: float = -1.0,
               num_distractors: int = 0):
    """Builds the task.

    Args:
      seed: seeds the cue draws (and the distractors), numpy Generator.
      span: steps from the cue (t = 0) to the decision (t = span), >= 1.
      num_cues: distinct cues, >= 2; also the number of actions.
      correct_reward: paid when the decision equals the cue.
      wrong_reward: paid for any other decision.
      num_distractors: noise entries appended to the observation, >= 0.
    """
    arguments.check_int("CueRecall", span, "span", 1)
    arguments.check_int("CueRecall", num_cues, "num_cues", 2)
    arguments.check_float("CueRecall", correct_reward, "correct_reward")
    arguments.check_float("CueRecall", wrong_reward, "wrong_reward")
    arguments.check_int("CueRecall", num_distractors, "num_distractors", 0)
    self._span = int(span)
    self._num_cues = int(num_cues)
    self._correct_reward = float(correct_reward)
    self._wrong_reward = float(wrong_reward)
    self._num_distractors = int(num_distractors)
    self._rng = np.random.default_rng(seed)
    self._flag_index = self._num_cues
    self._phase_index = self._num_cues + 1
    self._size = self._num_cues + 2 + self._num_distractors

    self._cue = 0
    self._t = 0
    self._needs_reset = True
    self._success: bool | None = None

  def _observation(self) -> np.ndarray:
    obs = np.zeros(self._size, np.float32)
    if self._t == 0:
      obs[self._cue] = 1.0
    if self._t == self._span:
      obs[self._flag_index] = 1.0
    obs[self._phase_index] = self._t / (self._span + 1)
    if self._num_distractors:
      obs[self._phase_index + 1:] = self._rng.random(self._num_distractors)
    return obs

  # -- dm_env API -------------------------------------------------------------

  def reset(self) -> dm_env.TimeStep:
    self._cue = int(self._rng.integers(self._num_cues))
    self._t = 0
    self._needs_reset = False
    self._success = None
    return dm_env.restart(self._observation())

  def step(self, action) -> dm_env.TimeStep:
    if self._needs_reset:
      return self.reset()
    a = int(action)
    if not 0 <= a < self._num_cues:
      raise ValueError(f"CueRecall: action must be in [0, {self._num_cues}), "
                       f"got {action!r}")
    decided = self._t == self._span
    self._t += 1
    obs = self._observation()
    if not decided:
      return dm_env.transition(0.0, obs)
    self._success = a == self._cue
    self._needs_reset = True
    return dm_env.termination(
        self._correct_reward if self._success else self._wrong_reward, obs)

  def observation_spec(self) -> specs.Array:
    return specs.Array((self._size,), np.float32, name="observation")

  def action_spec(self) -> specs.DiscreteArray:
    return specs.DiscreteArray(self._num_cues, dtype=np.int32, name="action")

  # -- success protocol and introspection (tests, scripted oracles) -----------

  def episode_success(self) -> bool | None:
    """True/False once an episode has ended, None while one is running."""
    return self._success

  @property
  def span(self) -> int:
    return self._span

  @property
  def num_cues(self) -> int:
    return self._num_cues

  @property
  def cue(self) -> int:
    """The current episode's cue (the action that pays `correct_reward`)."""
    return self._cue
