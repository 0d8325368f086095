"""experiments/results/README.md indexes the folder: every result is linked
from it, and every link in it points to a file that exists."""
import os
import re

from doc_blocks import ROOT  # pylint: disable=wrong-import-order

RESULTS = os.path.join(ROOT, "experiments", "results")
INDEX = os.path.join(RESULTS, "README.md")


def link_targets():
  with open(INDEX, encoding="utf-8") as f:
    text = f.read()
  return {target.strip("<>").rstrip("/")
          for target in re.findall(r"\]\(([^)]+)\)", text)}


def test_every_result_is_in_the_index():
  targets = link_targets()
  missing = [name for name in sorted(os.listdir(RESULTS))
             if name != "README.md" and name not in targets]
  assert not missing, (f"experiments/results/README.md does not list "
                       f"{missing}: add a row for each")


def test_every_link_in_the_index_exists():
  broken = [target for target in sorted(link_targets())
            if not target.startswith("#") and
            not os.path.exists(os.path.join(RESULTS, target.split("#")[0]))]
  assert not broken, f"experiments/results/README.md links missing {broken}"
