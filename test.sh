#!/usr/bin/env bash
# Set up .venv with the test tools and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh dev
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
.venv/bin/python -m pytest "$@"
