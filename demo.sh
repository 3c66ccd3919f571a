#!/usr/bin/env bash
# The whole job on built-in synthetic data, from a fresh machine:
#   set up .venv, write a small synthetic 2D-3D-S tree, train a small UNet on areas
#   1 2 3 4 6, validate on 5a, test on 5b, and segment three frames of 5b.
# Everything goes to demo/ (rewritten on each run); TensorBoard: tensorboard --logdir demo/runs
set -euo pipefail
cd "$(dirname "$0")"
start=$SECONDS
bash setup.sh
python=.venv/bin/python
out=demo
rm -rf "$out"
export PYTHONWARNINGS=ignore::DeprecationWarning

$python -m seglab.synthetic --out "$out/data" --size 160 --images-per-area 40
$python main.py train --datadir "$out/data" --areas 1 2 3 4 6 --val-areas 5a \
  --model unet --num-blocks 3 --base-chan 16 --img-size 128 \
  --epochs 10 --batch-size 8 --lr 3e-3 --warmup-steps 50 --workers 1 \
  --logdir "$out/runs" --name unet-small
$python main.py test --model "$out/runs/unet-small/best.pt" --datadir "$out/data" --areas 5b \
  --out "$out/test" --save-predictions
# The first three frames of area 5b (a loop, not mapfile: macOS comes with bash 3.2).
frames=()
for frame in "$out"/data/area_5b/data/rgb/*.png; do
  if [[ ${#frames[@]} -lt 3 ]]; then frames+=("$frame"); fi
done
$python main.py predict --model "$out/runs/unet-small/best.pt" "${frames[@]}" --out "$out/predictions"
echo "demo finished in $((SECONDS - start)) s: test results in $out/test, pictures in $out/predictions"
