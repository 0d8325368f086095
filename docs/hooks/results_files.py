"""mkdocs hook: serves experiments/results/ (figures, JSON, CSV) at
results-files/ in the site, and the repository's BUILD.md as the Install
page. Pages link a result file as `../experiments/results/NAME` (which GitHub
renders too); the hook rewrites those links to the served copy, so a missing
file fails the strict build. BUILD.md links pages as `docs/NAME.md`, which
the hook rewrites to `NAME.md`."""
import os
import re

from mkdocs.structure.files import File

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                    os.pardir)
RESULTS = os.path.join(ROOT, "experiments", "results")
SERVED = (".png", ".json", ".csv")
BUILD = os.path.join(ROOT, "BUILD.md")


def on_files(files, config):
  for name in sorted(os.listdir(RESULTS)):
    path = os.path.join(RESULTS, name)
    if os.path.isfile(path) and name.endswith(SERVED):
      files.append(File.generated(config, f"results-files/{name}",
                                  abs_src_path=path))
  with open(BUILD, encoding="utf-8") as f:
    install = re.sub(r"\]\(docs/", "](", f.read())
  files.append(File.generated(config, "install.md", content=install))
  return files


def on_page_markdown(markdown, page, config, files):
  del page, config, files  # unused
  return markdown.replace("](../experiments/results/", "](results-files/")
