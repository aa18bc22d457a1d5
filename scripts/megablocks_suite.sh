#!/usr/bin/env bash
# Runs MegaBlocks 0.10's own test suite, unchanged, against this package (on a GPU: its tests are
# all marked `gpu` and use CUDA tensors).
#
#   scripts/megablocks_suite.sh MEGABLOCKS_SRC LOG_DIR [PYTEST_ARGS...]
#
# MEGABLOCKS_SRC is a checkout of https://github.com/databricks/megablocks at its 0.10 release
# (commit efa7186, "version bump (#175)"); only its tests/ folder is read. Its harness imports a few
# names from composer (seeding and single-process stand-ins for its distributed helpers, in its
# conftest and fixtures, not in the tests): scripts/megablocks_suite/composer provides them, so
# composer and its dependencies need not be installed. Its pytest options that need plugins we do
# not use (--codeblocks) are replaced; everything else, the tests and their tolerances, is theirs.
set -uo pipefail
SRC=${1:?usage: scripts/megablocks_suite.sh MEGABLOCKS_SRC LOG_DIR [PYTEST_ARGS...]}
LOG_DIR=${2:?usage: scripts/megablocks_suite.sh MEGABLOCKS_SRC LOG_DIR [PYTEST_ARGS...]}
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=$(cd "$SRC" && pwd)
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
# Their tests and pytest settings only, in a folder of their own, so that `import megablocks`
# finds this package and never the checkout's.
WORK=$(mktemp -d)
cp -r "$SRC/tests" "$SRC/pyproject.toml" "$WORK/"
cd "$WORK"
PYTHONPATH="$ROOT/scripts/megablocks_suite:$ROOT:$WORK${PYTHONPATH:+:$PYTHONPATH}" \
  python3 -m pytest -p no:cacheprovider -o addopts="--tb=short --strict-markers" -m gpu -rfE \
  --rootdir "$WORK" tests "$@" 2>&1 | tee "$LOG_DIR/megablocks_suite.log"
exit "${PIPESTATUS[0]}"
