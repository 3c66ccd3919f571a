#!/usr/bin/env bash
# Create .venv beside this file and install the project's dependencies into it.
#   bash setup.sh              runtime dependencies (requirements.txt)
#   bash setup.sh dev          plus the test tools (requirements-dev.txt)
#   bash setup.sh cpu [dev]    the same with PyTorch's CPU-only build, from PyTorch's own
#                              index: on Linux the default torch brings NVIDIA's CUDA
#                              libraries (a 5.8 GB .venv instead of about 1.2 GB)
#   bash setup.sh --dry-run …  print the commands instead of running them
# docs/install.md gives the same commands for Windows, without bash.
set -euo pipefail
cd "$(dirname "$0")"
requirements=requirements.txt
cpu=false
dry_run=false
for argument in "$@"; do
  case "$argument" in
    dev) requirements=requirements-dev.txt ;;
    cpu) cpu=true ;;
    --dry-run) dry_run=true ;;
    *) echo "setup.sh: unknown argument '$argument' (expected dev, cpu or --dry-run)" >&2; exit 2 ;;
  esac
done

# Run a command, or with --dry-run print it as one could paste it into a shell.
run() {
  if ! $dry_run; then
    "$@"
    return
  fi
  local words=() word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=+-]+$ ]]; then words+=("$word"); else words+=("'$word'"); fi
  done
  echo "${words[*]}"
}

python=.venv/bin/python
if [[ ! -x $python ]]; then
  run python3 -m venv .venv
fi
run $python -m pip install --quiet --upgrade pip
if $cpu; then
  # torch and torchvision in the versions of constraints.txt from PyTorch's CPU-only index;
  # the rest from PyPI, where pip then finds them already installed.
  run $python -m pip install --quiet torch torchvision -c constraints.txt \
    --index-url https://download.pytorch.org/whl/cpu
fi
run $python -m pip install --quiet -r "$requirements" -c constraints.txt
run $python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available(), "mps", torch.backends.mps.is_available())'
