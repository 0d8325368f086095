"""I-Maze: a partially observable memory task (after Oh et al. 2016).

Layout for corridor length N (row 0 at the top, 3 columns)::

    G . G      row 0: left goal, junction, right goal
    # . #      rows 1..N: the vertical corridor
    # . #
    # S #      row N: start cell (bottom of the corridor)
    # I #      row N+1: the indicator block (not walkable)

The agent starts at S; its observation is a 3x3
local view centred on itself, one-hot over (wall, goal, indicator colour 0,
indicator colour 1); floor is all zeros and outside the maze reads as wall.
The indicator block is in view only from the start cell. Its colour (drawn
uniformly per episode) decides which goal pays `correct_reward`: colour 0 ->
left goal, colour 1 -> right goal. Entering either goal ends the episode
(termination, discount 0); the other goal pays `wrong_reward`. Running out of
`time_limit` steps ends the episode with reward 0 and discount
`time_limit_discount` (1.0: a dm_env truncation).

Why memory is needed: every cell except the start cell has the same view for
both colours, so a memoryless (reactive) policy chooses between the goals
independently of the colour and succeeds in at most 50% of episodes.

Default N = 4 (time limit 28): the colour must be carried for at least
N + 1 = 5 steps with no cue in view, so a memoryless policy is stuck at 50%,
while a uniformly random policy still ends at a goal in ~37% of episodes, so
learning gets reward signal from the start. Measured with a small A2C + LSTM
(64 units, 32 envs, CPU): >= 90% success after 0.09-0.73 M env steps (10-30 s)
over 3 seeds at N=4, wrong_reward=-1; at N=6 the same agent stayed at ~10%
for 3.3 M steps with wrong_reward=-1 (avoiding both goals is as good as
guessing) but learned in 0.4-0.7 M steps with wrong_reward=0. Longer
corridors (the harder, paper-style setting) are one keyword away.

Actions: 0 up, 1 down, 2 left, 3 right; moving into a wall is a no-op.
"""
from __future__ import annotations

import dm_env
from dm_env import specs
import numpy as np

from ald_jax.envs import arguments

UP, DOWN, LEFT, RIGHT = 0, 1, 2, 3
NUM_ACTIONS = 4
_MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))

# Observation channels of the local view.
WALL, GOAL, INDICATOR_0, INDICATOR_1 = 0, 1, 2, 3
NUM_CHANNELS = 4
VIEW = 3  # the local view is VIEW x VIEW, centred on the agent

DEFAULT_CORRIDOR_LENGTH = 4


def default_time_limit(corridor_length: int) -> int:
  """Steps before timeout: 4x the shortest path (N + 1) plus slack.

  Grows with N so that a longer corridor stays explorable by a random policy.
  """
  return 4 * (corridor_length + 1) + 8


class IMaze(dm_env.Environment):
  """I-Maze with a 3x3 local view; see the module docstring for the rules.

  Success protocol: `episode_success()` returns True when the last episode
  ended at the correct goal, False when it ended at the wrong goal or timed
  out, None while an episode is running.
  """

  def __init__(self,
               seed: int = 0,
               corridor_length: int = DEFAULT_CORRIDOR_LENGTH,
               time_limit: int | None = None,
               correct_reward: float = 1.0,
               wrong_reward: float = -1.0,
               time_limit_discount: float = 1.0,
               flat_obs: bool = True):
    """Builds the maze.

    Args:
      seed: seeds the indicator colour draws (numpy Generator).
      corridor_length: N >= 1 corridor cells (rows 1..N); the start cell is
        the bottom one, N moves below the junction.
      time_limit: steps per episode; None -> `default_time_limit(N)`. Must be
        >= N + 1 (the shortest path).
      correct_reward: paid on entering the goal the indicator points to.
      wrong_reward: paid on entering the other goal (also ends the episode).
      time_limit_discount: discount of the LAST step on timeout, in [0, 1].
      flat_obs: True -> observation shape (36,); False -> (3, 3, 4).
    """
    arguments.check_int("IMaze", corridor_length, "corridor_length", 1)
    if time_limit is None:
      time_limit = default_time_limit(corridor_length)
    arguments.check_int("IMaze", time_limit, "time_limit", corridor_length + 1)
    arguments.check_reward_options("IMaze", correct_reward, wrong_reward,
                                   time_limit_discount, flat_obs)
    self._n = int(corridor_length)
    self._time_limit = int(time_limit)
    self._correct_reward = float(correct_reward)
    self._wrong_reward = float(wrong_reward)
    self._time_limit_discount = float(time_limit_discount)
    self._flat = flat_obs
    self._rng = np.random.default_rng(seed)

    self._cells = _walkable_cells(self._n)
    index = {cell: i for i, cell in enumerate(self._cells)}
    self._left_goal = index[(0, 0)]
    self._right_goal = index[(0, 2)]
    self._start = index[(self._n, 1)]
    # next_cell[cell][action]: plain lists, cheaper to index than numpy here.
    self._next_cell = [[index.get((r + dr, c + dc), i) for dr, dc in _MOVES]
                       for i, (r, c) in enumerate(self._cells)]
    self._obs_table = _observation_table(self._n, self._cells, self._flat)

    self._cell = self._start
    self._indicator = 0
    self._t = 0
    self._needs_reset = True
    self._success: bool | None = None

  # -- dm_env API -------------------------------------------------------------

  def reset(self) -> dm_env.TimeStep:
    self._indicator = int(self._rng.integers(2))
    self._cell = self._start
    self._t = 0
    self._needs_reset = False
    self._success = None
    return dm_env.restart(self._obs_table[self._indicator][self._cell])

  def step(self, action) -> dm_env.TimeStep:
    if self._needs_reset:
      return self.reset()
    a = int(action)
    if not 0 <= a < NUM_ACTIONS:
      raise ValueError(f"IMaze: action must be in [0, {NUM_ACTIONS}), got "
                       f"{action!r}")
    cell = self._next_cell[self._cell][a]
    self._cell = cell
    self._t += 1
    obs = self._obs_table[self._indicator][cell]
    if cell == self._left_goal or cell == self._right_goal:
      correct = (cell == self._left_goal) == (self._indicator == 0)
      self._success = correct
      self._needs_reset = True
      reward = self._correct_reward if correct else self._wrong_reward
      return dm_env.termination(reward, obs)
    if self._t >= self._time_limit:
      self._success = False
      self._needs_reset = True
      return dm_env.truncation(0.0, obs, self._time_limit_discount)
    return dm_env.transition(0.0, obs)

  def observation_spec(self) -> specs.Array:
    shape = (VIEW * VIEW * NUM_CHANNELS,) if self._flat else (
        VIEW, VIEW, NUM_CHANNELS)
    return specs.Array(shape, np.float32, name="observation")

  def action_spec(self) -> specs.DiscreteArray:
    return specs.DiscreteArray(NUM_ACTIONS, dtype=np.int32, name="action")

  # -- success protocol and introspection (tests, scripted oracles) -----------

  def episode_success(self) -> bool | None:
    """True/False once an episode has ended, None while one is running."""
    return self._success

  @property
  def corridor_length(self) -> int:
    return self._n

  @property
  def time_limit(self) -> int:
    return self._time_limit

  @property
  def indicator(self) -> int:
    """The current episode's colour (0 -> left goal pays, 1 -> right)."""
    return self._indicator

  @property
  def agent_position(self) -> tuple[int, int]:
    """(row, column) of the agent; row 0 is the goal row."""
    return self._cells[self._cell]


def _walkable_cells(n: int) -> list[tuple[int, int]]:
  """Goal row (left goal, junction, right goal) then corridor rows 1..N."""
  return [(0, 0), (0, 1), (0, 2)] + [(r, 1) for r in range(1, n + 1)]


def _observation_table(n: int, cells: list[tuple[int, int]],
                       flat: bool) -> list[list[np.ndarray]]:
  """Precomputed read-only views: table[indicator][cell] -> observation.

  The maze is static given the colour, so each step is one lookup; views are
  read-only so that a caller cannot corrupt the table through an observation.
  """
  walkable = set(cells)
  table = []
  for colour in range(2):
    per_cell = []
    for r, c in cells:
      view = np.zeros((VIEW, VIEW, NUM_CHANNELS), np.float32)
      for i in range(VIEW):
        for j in range(VIEW):
          rr, cc = r + i - 1, c + j - 1
          if (rr, cc) == (n + 1, 1):
            view[i, j, INDICATOR_0 + colour] = 1.0
          elif (rr, cc) not in walkable:
            view[i, j, WALL] = 1.0
          elif rr == 0 and cc != 1:
            view[i, j, GOAL] = 1.0
      if flat:
        view = view.reshape(-1)
      view.setflags(write=False)
      per_cell.append(view)
    table.append(per_cell)
  return table
