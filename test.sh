#!/usr/bin/env bash
# Set up .venv with the test tools and run the tests (in the student bundle: every
# self-check, however the answers are formatted). With PYTHON=/path/to/python set, the
# setup is skipped and that interpreter runs them. The linter runs in CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")"
if [[ -z "${PYTHON:-}" ]]; then
  bash setup.sh dev
  PYTHON=.venv/bin/python
fi
"$PYTHON" -m pytest "$@"
