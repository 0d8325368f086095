"""Constructor-argument checks shared by the built-in environments."""
from __future__ import annotations

import numpy as np


def check_int(env_name: str, value, name: str, minimum: int) -> None:
  if (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
      or value < minimum):
    raise ValueError(f"{env_name}: {name} must be an integer >= {minimum}, "
                     f"got {value!r}")


def check_float(env_name: str, value, name: str) -> None:
  if (not isinstance(value, (int, float, np.number)) or isinstance(value, bool)
      or not np.isfinite(value)):
    raise ValueError(f"{env_name}: {name} must be a finite number, got "
                     f"{value!r}")


def check_reward_options(env_name: str, correct_reward, wrong_reward,
                         time_limit_discount, flat_obs) -> None:
  """The reward / episode-end / observation options both tasks share."""
  check_float(env_name, correct_reward, "correct_reward")
  check_float(env_name, wrong_reward, "wrong_reward")
  check_float(env_name, time_limit_discount, "time_limit_discount")
  if not 0.0 <= time_limit_discount <= 1.0:
    raise ValueError(f"{env_name}: time_limit_discount must be in [0, 1], got "
                     f"{time_limit_discount!r}")
  if not isinstance(flat_obs, bool):
    raise ValueError(f"{env_name}: flat_obs must be a bool, got {flat_obs!r}")
