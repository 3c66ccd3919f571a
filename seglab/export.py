"""A trained model for programs without this project: ONNX files and torch.export programs.

    python main.py export --model best.pt --out model.onnx      (ONNX, for onnxruntime)
    python main.py export --model best.pt --out model.pt2       (torch.export.ExportedProgram)

Both hold `models.Segmenter`, the whole of `python main.py predict` in one graph: input
`image`, `(N, 3, H, W)` uint8 RGB with N from 1 to 4096 and H and W from 1 to 16384 (the
ranges of `dynamic_image_shapes`: a .pt2 program refuses other sizes; split larger batches,
scale larger pictures down or segment them with `main.py predict`); output `logits`,
`(N, 14, H, W)` float32 at the input's size; the argmax over dim 1 is the class of each
pixel. At full size the logits take 56 bytes a pixel: 2.8 GB for a 50-megapixel photo,
which `main.py predict` avoids (seglab/inference.py). An ONNX file
also carries, as metadata, the class names in order, their colors, the model configuration
and the training size (`read_onnx_metadata`).

ONNX export goes through torch.export (the "dynamo" exporter), which keeps the image size
symbolic: the UNet's padding and the resizes work at any size, where the older tracer
fixed them at the sample's. It needs the packages onnx and onnxscript; running an ONNX file
needs onnxruntime. All three are optional (see README, "Dependencies").
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path

import torch

import data
import models
from seglab import checkpoints, depth, downloads
from seglab.devices import UsageError

ONNX_OPSET = 18  # the first opset whose Resize has `antialias`, used by the image resize
METADATA_FORMAT = "segmentation-lab-onnx/1"
# A sample for torch.export: its sizes are not special (odd, not square, not multiples of
# 16), so that no size-dependent branch of the model is fixed by accident.
SAMPLE_SHAPE = (2, 3, 97, 131)


class ExportError(Exception):
    """A model that cannot be exported or run; the message says what to install or change."""


def missing_package(package: str, purpose: str) -> ExportError:
    """The one-line error for an optional package that is not installed."""
    return ExportError(
        f"{purpose} needs the optional package {package}: pip install {package} "
        "(see README, Dependencies)"
    )


@contextlib.contextmanager
def quiet_trace_log():
    """Drop the records of torch's structured trace log ("torch.__trace") while exporting.

    torch.export logs every symbol and string of the graph it builds there, at DEBUG, for
    the files of TORCH_TRACE; under pytest, whose handlers catch them too, a failing check
    would print dozens of empty `DEBUG torch.__trace` lines. With TORCH_TRACE set, as when
    debugging the exporter, the records go through as usual.
    """
    trace_log = logging.getLogger("torch.__trace")
    if os.environ.get("TORCH_TRACE"):
        yield
        return

    def drop_all(record: logging.LogRecord) -> bool:
        return False

    trace_log.addFilter(drop_all)
    try:
        yield
    finally:
        trace_log.removeFilter(drop_all)


# The sizes an exported program takes: torch.export needs bounds, and a .pt2 program
# refuses inputs past them (onnxruntime does not check them).
MAX_EXPORT_BATCH, MAX_EXPORT_SIDE = 4096, 16384


def dynamic_image_shapes() -> dict:
    """`dynamic_shapes` of torch.export for the input `image`: batch, height and width free
    up to MAX_EXPORT_BATCH and MAX_EXPORT_SIDE."""
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    height = torch.export.Dim("height", min=1, max=MAX_EXPORT_SIDE)
    width = torch.export.Dim("width", min=1, max=MAX_EXPORT_SIDE)
    return {"images": {0: batch, 2: height, 3: width}}


def onnx_metadata(checkpoint: dict) -> dict[str, str]:
    """What a program needs to use the ONNX file, as strings (JSON where structured)."""
    return {
        "format": METADATA_FORMAT,
        "classes": json.dumps(list(data.CLASSES)),
        "class_colors": json.dumps([list(color) for color in data.CLASS_COLORS.values()]),
        "model_config": json.dumps(checkpoint["model_config"]),
        "img_size": str(checkpoint["img_size"]),
        "input": "image: (N, 3, H, W) uint8 RGB, N up to 4096, H and W up to 16384",
        "output": "logits: (N, K, H, W) float32; argmax over dim 1 gives the class ids",
    }


def replace_atomically(write, path: Path) -> None:
    """Call `write(temporary_path)`, then rename the file over `path`: an export that fails
    halfway leaves no file, and an earlier file at `path` stays whole until then."""
    # The suffix stays last: torch.export.save wants a file name ending in .pt2.
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:  # a full disk, a folder that turned read-only
        raise ExportError(
            f"cannot write {path}: {error.strerror or error}; nothing was written"
        ) from None
    finally:
        temporary.unlink(missing_ok=True)


def export_onnx(segmenter: models.Segmenter, checkpoint: dict, path: Path) -> None:
    """Write `segmenter` as a standalone ONNX file with metadata, checked by onnx's checker."""
    try:
        import onnx
        import onnxscript  # noqa: F401 (the exporter needs it; imported here to say so)
    except ImportError as error:
        raise missing_package(error.name or "onnx onnxscript", "exporting to ONNX") from None
    sample = torch.randint(0, 256, SAMPLE_SHAPE, dtype=torch.uint8)
    with quiet_trace_log():
        program = torch.onnx.export(
            segmenter.eval(),
            (sample,),
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=dynamic_image_shapes(),
            opset_version=ONNX_OPSET,
            dynamo=True,
            verbose=False,
        )
    model_proto = program.model_proto
    for key, value in onnx_metadata(checkpoint).items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model_proto, full_check=True)
    replace_atomically(lambda temporary: onnx.save(model_proto, temporary), path)


def export_program(segmenter: models.Segmenter, path: Path) -> None:
    """Write `segmenter` as a torch.export ExportedProgram (`torch.export.load` reads it)."""
    sample = torch.randint(0, 256, SAMPLE_SHAPE, dtype=torch.uint8)
    with quiet_trace_log():
        program = torch.export.export(
            segmenter.eval(), (sample,), dynamic_shapes=dynamic_image_shapes()
        )
    # Saved into memory first: torch.export.save writes through a C++ zip writer that
    # aborts the whole interpreter when a write fails (a full disk), where Python's own
    # writes raise an error that can be reported.
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    replace_atomically(lambda temporary: temporary.write_bytes(buffer.getvalue()), path)


def onnx_session(path: str | Path, serialized: bytes | None = None):
    """An onnxruntime.InferenceSession of the ONNX file at `path` (or of `serialized`, a
    model taken from it), on the GPU when onnxruntime has one, else on the CPU."""
    try:
        import onnxruntime
    except ImportError:
        raise missing_package("onnxruntime", f"running {path}") from None
    providers = [
        name
        for name in ("CUDAExecutionProvider", "CPUExecutionProvider")
        if name in onnxruntime.get_available_providers()
    ]
    try:
        source = str(path) if serialized is None else serialized
        return onnxruntime.InferenceSession(source, providers=providers)
    except Exception as error:  # onnxruntime raises its own error types, all to be reported
        raise ExportError(f"cannot load {path} with onnxruntime: {error}") from None


def read_onnx_metadata(session, path: str | Path = "the ONNX file") -> dict:
    """The metadata that `export_onnx` wrote, JSON decoded; refused, naming `path`, for
    another project's file, for other classes than this project's, and for a graph that
    does not take `image` and give `logits` of this project's classes."""
    found = session.get_modelmeta().custom_metadata_map
    if found.get("format") != METADATA_FORMAT:
        raise ExportError(
            f"{path} was not written by `python main.py export` (no {METADATA_FORMAT} metadata)"
        )
    metadata = {key: value for key, value in found.items() if key not in ("input", "output")}
    for key in ("classes", "class_colors", "model_config"):
        metadata[key] = metadata_json(found, key, path)
    try:
        metadata["img_size"] = int(found["img_size"])
    except (KeyError, ValueError):
        raise ExportError(f"{path}: its metadata img_size is not a whole number") from None
    if metadata["classes"] != list(data.CLASSES):
        raise ExportError(f"{path} has the classes {metadata['classes']}, not {list(data.CLASSES)}")
    check_onnx_signature(session, path)
    return metadata


def metadata_json(found: dict, key: str, path: str | Path):
    """The metadata entry `key` of an ONNX file, decoded from JSON."""
    if key not in found:
        raise ExportError(f"{path}: its metadata lacks {key}; export the model again")
    try:
        return json.loads(found[key])
    except (json.JSONDecodeError, RecursionError):
        raise ExportError(
            f"{path}: its metadata {key} is not JSON; export the model again"
        ) from None


def check_onnx_signature(session, path: str | Path) -> None:
    """Refuse a graph whose input is not `image` `(N, 3, H, W)` uint8, or whose output
    `logits` has another number of channels than this project's classes."""
    inputs = [(item.name, item.type, item.shape) for item in session.get_inputs()]
    if len(inputs) != 1 or inputs[0][0] != "image" or inputs[0][1] != "tensor(uint8)":
        raise ExportError(
            f"{path} takes {inputs}, not one input `image` of uint8: it is not a model that "
            "`python main.py export` wrote"
        )
    outputs = {item.name: item.shape for item in session.get_outputs()}
    shape = outputs.get("logits")
    if shape is None or len(shape) != 4 or shape[1] != data.NUM_CLASSES:
        raise ExportError(
            f"{path} gives {outputs}, not `logits` of shape (N, {data.NUM_CLASSES}, H, W): it "
            "is not a model of this project's classes"
        )


def network_session(path: str | Path):
    """An onnxruntime session of the network inside the ONNX file `path`: the part of its
    graph between models.Segmenter's two resizes, which takes the normalized image at the
    network's size and gives the logits at that size. Returns the session and the names of
    its input and output. Needs the package onnx, to cut the graph."""
    try:
        import onnx
        import onnx.utils
    except ImportError:
        raise missing_package("onnx", f"segmenting large pictures with {path}") from None
    model_proto = onnx.load(str(path))
    # In models.Segmenter's graph, the image resize is the first Resize, and the logits
    # resize is the one that writes `logits`.
    resizes = [node for node in model_proto.graph.node if node.op_type == "Resize"]
    last = [node for node in resizes if list(node.output) == ["logits"]]
    if not resizes or not last:
        raise ExportError(f"{path}: its graph is not one that `python main.py export` writes")
    input_name, output_name = resizes[0].output[0], last[0].input[0]
    network = onnx.utils.Extractor(model_proto).extract_model([input_name], [output_name])
    return onnx_session(path, network.SerializeToString()), input_name, output_name


def export_checkpoint(model: str, out: Path) -> None:
    """The `export` command: the model of the checkpoint `model` (a path or a URL) as ONNX
    (.onnx) or torch.export (.pt2) in `out`."""
    if out.suffix not in (".onnx", ".pt2"):
        raise UsageError(f"--out {out}: name an .onnx or a .pt2 file")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    if "://" not in model and Path(model).resolve() == out.resolve():
        raise UsageError(f"--out {out} is the --model file: name another file, or it is lost")
    model_file = downloads.local_model_file(model)
    checkpoint = checkpoints.load_checkpoint(model_file)
    if depth.uses_depth(checkpoint.get("inputs", ["rgb"])):
        raise UsageError(
            f"{model} was trained with depth; export writes RGB models only (run it "
            "with `main.py predict`)"
        )
    network = checkpoints.model_from_checkpoint(checkpoint, model_file)
    segmenter = models.Segmenter(network, checkpoint["img_size"])
    if out.suffix == ".onnx":
        export_onnx(segmenter, checkpoint, out)
    else:
        export_program(segmenter, out)
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): uint8 images in (up to "
        f"{MAX_EXPORT_BATCH} of up to {MAX_EXPORT_SIDE} px a side), logits out"
    )
