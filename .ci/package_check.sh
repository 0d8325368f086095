#!/usr/bin/env bash
# Builds the wheel and sdist, installs the wheel into a fresh virtualenv and
# runs the installed `ald-train --help` and the README's import snippet
# there, outside the checkout (so the installed package is what runs).
# Packages come from pip's configured index / mirror and its cache.
# Usage: .ci/package_check.sh [python3]   (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${1:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== build: sdist, then the wheel from the sdist"
"$python" -m venv "$work/tools"
"$work/tools/bin/pip" install --quiet build
"$work/tools/bin/python" -m build --outdir "$work/dist" "$root" \
  >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
ls -l "$work/dist"
sdist=$(ls "$work"/dist/*.tar.gz)
tar -tzf "$sdist" >"$work/sdist.txt"
for member in LICENSE CITATION.cff README.md setup.py ald_jax/train.py; do
  grep -q "/$member\$" "$work/sdist.txt" \
    || { echo "sdist lacks $member"; exit 1; }
done

echo "== install the wheel into a fresh virtualenv"
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet -c "$root/constraints.txt" \
  "$work"/dist/*.whl

cd "$work"  # away from the checkout: nothing imports its ald_jax/
echo "== ald-train --help"
"$work/venv/bin/ald-train" --help >"$work/help.txt"
head -3 "$work/help.txt"
grep -q "^Exit status:" "$work/help.txt"

echo "== the README's import snippet"
"$python" - "$root/README.md" >"$work/snippet.py" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
match = re.search(r"<!-- readme-snippet:start -->\s*```python\n(.*?)```",
                  text, re.S)
sys.exit("README snippet markers not found") if not match else print(
    match.group(1))
PY
"$work/venv/bin/python" -c "import ald_jax, sys; \
  assert ald_jax.__file__.startswith('$work'), ald_jax.__file__"
"$work/venv/bin/python" "$work/snippet.py" | tee "$work/snippet.out"
grep -q "steps 3" "$work/snippet.out"
echo "package check: ok"
