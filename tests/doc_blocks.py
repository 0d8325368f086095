"""The code blocks of README.md, BUILD.md and docs/*.md, by their test
markers: a python block is preceded by `<!-- test: NAME -->` and run by a
test (tests/test_docs_code.py checks that every one is)."""
import glob
import os
import re

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
PAGES = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "BUILD.md")
         ] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^```(\S*)\s*$")


def code_blocks(path):
  """[(language, marker or None, code)] of a Markdown file."""
  lines = open(path, encoding="utf-8").read().split("\n")
  blocks, i = [], 0
  while i < len(lines):
    match = FENCE.match(lines[i])
    if match:
      previous = lines[i - 1].strip() if i else ""
      marker = re.fullmatch(r"<!-- (?:test: (\S+)|(readme-snippet):start) -->",
                            previous)
      end = next(j for j in range(i + 1, len(lines)) if lines[j] == "```")
      name = (marker.group(1) or marker.group(2)) if marker else None
      blocks.append((match.group(1), name, "\n".join(lines[i + 1:end])))
      i = end
    i += 1
  return blocks


def marked_block(name):
  for path in PAGES:
    for _, marker, code in code_blocks(path):
      if marker == name:
        return code
  raise AssertionError(f"no block marked {name!r}")
