"""ALD training from the experiments folder; the same flags as `python -m ald_jax.train`.

    python experiments/train.py --agent=ald --env=imaze --total_env_steps=500000
"""
from ald_jax import train

if __name__ == "__main__":
  train.run_cli()
