"""Environment factories for tests with actor processes. A child process
imports this module by name to unpickle them, so it imports only the
environments (not pytest or the test modules)."""
import os
import threading

from ald_jax.envs import imaze


class HangingIMaze:
  """Factory of I-Maze environments that block forever after 20 steps. With
  `marker_dir`, a hanging environment first creates `hung.<pid>` there."""

  def __init__(self, marker_dir: str = ""):
    self.marker_dir = marker_dir

  def __call__(self, seed):
    marker_dir = self.marker_dir

    class Env(imaze.IMaze):
      steps = 0

      def step(self, action):
        self.steps += 1
        if self.steps > 20:
          if marker_dir:
            open(os.path.join(marker_dir, f"hung.{os.getpid()}"), "w").close()
          threading.Event().wait()  # hangs
        return super().step(action)
    return Env(seed=seed)


class ExplodingIMaze:
  """I-Maze environments that raise after 30 steps."""

  def __call__(self, seed):

    class Env(imaze.IMaze):
      steps = 0

      def step(self, action):
        self.steps += 1
        if self.steps > 30:
          raise RuntimeError("env exploded")
        return super().step(action)
    return Env(seed=seed)
