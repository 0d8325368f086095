"""The README's learner snippet runs as written."""
import contextlib
import io
import os
import re

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def readme_snippet() -> str:
  text = open(README, encoding="utf-8").read()
  match = re.search(r"<!-- readme-snippet:start -->\s*```python\n(.*?)```",
                    text, re.S)
  assert match, "README snippet markers not found"
  return match.group(1)


def test_readme_snippet_runs_and_trains():
  out = io.StringIO()
  namespace: dict = {}
  with contextlib.redirect_stdout(out):
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert "steps 3" in out.getvalue()
  assert int(namespace["state"].step) == 3
