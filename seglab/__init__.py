"""The machinery of segmentation-lab: what the lab's files (data.py, models.py, metrics.py,
losses.py, main.py, utils.py) call, and what a student never needs to open.

Commands: `python -m seglab.MODULE --help` from the project folder.

- cli: argument types that refuse bad values, help texts, every program's errors as one line
- flags: main.py's commands and every flag, with its help and its check
- devices: CPU, CUDA or Apple's GPU, torchrun and DistributedDataParallel, precision, the
  loss scaler
- runstate: exact resume (data order and augmentations by seed, epoch and frame; random
  states) and the step's health, kept on the device between checks
- preemption: a cluster's stop signals and --checkpoint-minutes: save, then exit 75
- checkpoints: the checkpoint format, atomic saving, safe loading, restoring a run from it
- runfolder: the run folder, its lock, metrics.jsonl, what --resume continues
- downloads: models by URL and torchvision's weights, checked against the hash in their name
- tensorboard_log: what training shows in TensorBoard
- evaluation: the machinery of `main.py test` (per-area scores, metrics.json)
- inference: the machinery of `main.py predict` (reading any picture, writing masks)
- export: ONNX and torch.export files, and running ONNX files with ONNX Runtime
- depth: depth as a network input (RGB-D)
- cache: the pre-decoded cache; `python -m seglab.cache write`
- explore: `python -m seglab.explore show | histogram`, on a raw root or a cache
- check: `python -m seglab.check`, every file of a data set; checks training makes
- pngfiles: damaged PNGs, found before a decoder can crash on them
- filesystem: file locks released with their process (flock, msvcrt), flushing a folder
- setup_check: `python progress.py --setup`, the check of a machine before the session
- synthetic: `python -m seglab.synthetic`, scenes in the exact 2D-3D-S format
- bench: `python -m seglab.bench`, the speed benchmark

main.py wires the package into the loop. The lab's other files import only three small
modules of it (cli, pngfiles, downloads), which import no lab file but data.py; the rest of
the package may import the lab's files. No module imports another that imports it back
(tests/test_layout.py checks both).
"""

import os
import signal
import sys


def _end_quietly(signum: int, frame) -> None:
    print("\ninterrupted (Ctrl-C)", file=sys.stderr)
    os._exit(130)  # the status of a program ended by Ctrl-C; nothing is written yet


# `python -m seglab.MODULE` imports this package first, while sys.argv[0] is still "-m"
# (see Python's documentation of -m). Ctrl-C in the seconds that importing torch takes
# would end in a traceback: until cli.run takes Ctrl-C over, it ends the program in one
# line. Imported any other way, the package leaves the signal alone.
if sys.argv[:1] == ["-m"]:
    signal.signal(signal.SIGINT, _end_quietly)
