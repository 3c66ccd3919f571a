#!/usr/bin/env bash
# Create .venv beside this file and install the project's dependencies into it.
#   bash setup.sh        runtime dependencies (requirements.txt)
#   bash setup.sh dev    plus the test tools (requirements-dev.txt)
set -euo pipefail
cd "$(dirname "$0")"
requirements=requirements.txt
[[ "${1:-}" == "dev" ]] && requirements=requirements-dev.txt
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r "$requirements" -c constraints.txt
.venv/bin/python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
