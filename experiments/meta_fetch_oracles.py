"""Meta-Fetch settings, scored by scripted oracles: does memory pay?

For each setting, the mean return of four policies (the oracles of
tests/test_envs_meta_fetch.py): one that knows the hidden order, one that
finds it by trial and error once and remembers it, one that forgets it at
every respawn, and a uniformly random one. Prints one JSON object.

    python experiments/meta_fetch_oracles.py [--episodes 60]
"""
import argparse
import datetime
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                os.pardir, "tests"))
# pylint: disable=wrong-import-position
from test_envs_meta_fetch import KnowingOracle, SearchingOracle, play
from ald_jax.envs.meta_fetch import MetaFetch

# (grid_size, num_objects, time_limit)
SETTINGS = ((5, 4, 100), (5, 3, 100), (4, 3, 50), (3, 3, 50))


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--episodes", type=int, default=60)
  parser.add_argument("--seed", type=int, default=1)
  args = parser.parse_args(argv)
  rows = []
  for grid_size, num_objects, time_limit in SETTINGS:
    env = MetaFetch(seed=args.seed, grid_size=grid_size,
                    num_objects=num_objects, time_limit=time_limit)
    rng = np.random.default_rng(0)
    policies = {"knowing": KnowingOracle(),
                "remembering": SearchingOracle(forget=False),
                "forgetting": SearchingOracle(forget=True), "random": None}
    row = {"grid_size": grid_size, "num_objects": num_objects,
           "time_limit": time_limit}
    for name, policy in policies.items():
      row[name] = round(float(np.mean(
          [play(env, policy, rng) for _ in range(args.episodes)])), 2)
    row["forgetting_over_remembering"] = round(
        row["forgetting"] / row["remembering"], 2)
    rows.append(row)
  print(json.dumps({
      "command": " ".join(["python", *sys.argv]),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "episodes": args.episodes, "seed": args.seed, "settings": rows},
                   indent=1))


if __name__ == "__main__":
  main(sys.argv[1:])
