"""Writes docs/cli.md from the CLI's flag table (`ald_jax.train`).

    python scripts/make_cli_reference.py          # rewrite docs/cli.md
    python scripts/make_cli_reference.py --check  # exit 1 if it is stale
"""
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, ROOT)

from ald_jax import train  # pylint: disable=wrong-import-position

CLI_MD = os.path.join(ROOT, "docs", "cli.md")


def main(argv) -> int:
  text = train.cli_reference()
  if "--check" in argv[1:]:
    with open(CLI_MD, encoding="utf-8") as f:
      if f.read() != text:
        print("docs/cli.md is stale: run python scripts/make_cli_reference.py",
              file=sys.stderr)
        return 1
    return 0
  with open(CLI_MD, "w", encoding="utf-8") as f:
    f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
