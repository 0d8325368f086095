"""docs/api.md documents every public name, with every parameter (for a
NamedTuple or dataclass: every field)."""
import inspect
import os
import re

import pytest

import ald_jax
from ald_jax import config
from ald_jax import envs
from ald_jax import learner
from ald_jax import metrics
from ald_jax import train
from ald_jax import types
from ald_jax.system import actor_sizing
from ald_jax.system import run

API_MD = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "api.md")

# module -> the public names docs/api.md must document (extend per module).
DOCUMENTED = {
    learner: ["make_learner", "Learner", "LearnerState", "ActorCore"],
    types: ["Batch"],
    train: ["train", "run_cli", "config_from_argv"],
    run: ["RunResult"],
    actor_sizing: ["resolve_auto_width"],
    ald_jax: ["Policy", "export_actor"],
    config: ["TrainConfig", "LearnerConfig", "TorsoConfig", "LSTMConfig",
             "GTrXLConfig", "VMPOConfig", "VTraceConfig", "DistillConfig",
             "OptimizerConfig", "ConfigError"],
    envs: envs.__all__,
    metrics: ["MetricsWriter", "tensorboard_available",
              "write_tensorboard_image", "read_metrics",
              "EpisodeWindow", "RateMeter", "format_progress"],
}


def _sections() -> dict[str, str]:
  """`### name` heading -> the text up to the next heading."""
  text = open(API_MD, encoding="utf-8").read()
  parts = re.split(r"^### `([^`]+)`\s*$", text, flags=re.M)
  return dict(zip(parts[1::2], parts[2::2]))


def _parameters(obj) -> list[str]:
  try:
    signature = inspect.signature(obj)
  except (TypeError, ValueError):
    return []
  return [p.name for p in signature.parameters.values()
          if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


CASES = [(module, name) for module, names in DOCUMENTED.items()
         for name in names]


@pytest.mark.parametrize("module, name", CASES,
                         ids=[f"{m.__name__}.{n}" for m, n in CASES])
def test_public_name_documented_with_its_parameters(module, name):
  sections = _sections()
  assert name in sections, f"docs/api.md has no '### `{name}`' entry"
  obj = getattr(module, name)
  if inspect.isclass(obj) and issubclass(obj, BaseException):
    return
  missing = [p for p in _parameters(obj)
             if not re.search(rf"\b{p}\b", sections[name])]
  assert not missing, f"docs/api.md entry for {name} misses {missing}"
