"""The data set's folds and depth as an input: the real depth format, transforms that keep
holes holes, the cache with depth, and RGB-D training, test and predict end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision import tv_tensors

import data
import main
import models
from seglab import cache, depth, synthetic

TINY_MODEL = ["--num-blocks", "2", "--base-chan", "4", "--img-size", "32"]


@pytest.fixture(scope="module")
def all_areas_root(tmp_path_factory) -> Path:
    """Every area of the data set, 2 frames each, 64x64 pixels, with depth."""
    root = tmp_path_factory.mktemp("all_areas")
    synthetic.generate(root, data.AREAS, images_per_area=2, size=64, seed=1, progress=False)
    return root


@pytest.fixture(scope="module")
def rgbd_run(all_areas_root, tmp_path_factory) -> Path:
    """A tiny RGB-D UNet trained one epoch on fold 3 (validation: held-out rooms)."""
    logdir = tmp_path_factory.mktemp("runs")
    args = ["train", "--datadir", str(all_areas_root), "--fold", "3", "--inputs", "rgb", "depth"]
    args += ["--epochs", "1", "--batch-size", "2", "--workers", "0", "--device", "cpu"]
    args += ["--logdir", str(logdir), "--name", "rgbd", "--warmup-steps", "1", *TINY_MODEL]
    assert main.main(args) == 0
    return logdir / "rgbd"


# ----------------------------------------------------------------------------------------
# Folds


def test_folds_are_the_published_ones_and_cover_every_area_once():
    published = {  # FORMAT.md: the data set paper's folds, area 5 being 5a and 5b
        1: ({"1", "2", "3", "4", "6"}, {"5a", "5b"}),
        2: ({"1", "3", "5a", "5b", "6"}, {"2", "4"}),
        3: ({"2", "4", "5a", "5b"}, {"1", "3", "6"}),
    }
    assert set(data.FOLDS) == set(published)
    for fold, (train_areas, test_areas) in data.FOLDS.items():
        assert (set(train_areas), set(test_areas)) == published[fold]
        assert sorted(train_areas + test_areas) == sorted(data.AREAS)


def test_fold_trains_on_its_areas_and_test_defaults_to_its_test_areas(
    rgbd_run, all_areas_root, tmp_path, capsys
):
    checkpoint = torch.load(rgbd_run / "best.pt", weights_only=True)
    assert checkpoint["args"]["fold"] == 3
    assert checkpoint["args"]["areas"] == ["2", "4", "5a", "5b"]
    assert main.main(["test", "--model", str(rgbd_run / "best.pt"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["areas"] == ["1", "3", "6"]
    # One line per area, then all of them together; the total counts every frame once.
    for area in ("1", "3", "6"):
        miou = written["per_area"][area]["miou"]
        assert f"area {area}: mIoU {miou:.4f}" in out
    assert f"mIoU: {written['miou']:.4f} (areas 1, 3, 6 together)" in out
    per_area_support = np.sum([written["per_area"][a]["support"] for a in ("1", "3", "6")], 0)
    assert per_area_support.tolist() == written["support"]


def test_default_areas_of_a_run_without_fold_are_fold_1s():
    args = main.build_parser().parse_args(["train"])
    assert args.areas is None and args.fold is None and args.inputs == ["rgb"]
    assert list(data.FOLDS[1][0]) == ["1", "2", "3", "4", "6"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fold", "4"], "argument --fold: invalid choice: 4"),
        (["--fold", "one"], "argument --fold: invalid int value: 'one'"),
        (["--fold", "1", "--areas", "1"], "argument --areas: not allowed with argument --fold"),
        (["--inputs", "depth"], "argument --inputs: expected rgb"),
        (["--inputs", "rgb", "rgb"], "argument --inputs: expected rgb"),
        (["--inputs", "rgb", "normals"], "argument --inputs: invalid choice: 'normals'"),
    ],
)
def test_bad_fold_or_inputs_end_with_one_error_line(args, message, capsys):
    assert_one_error_line(["train", *args], message, capsys)


def test_a_missing_depth_file_for_predict_ends_with_one_error_line(capsys):
    args = ["predict", "--model", "m.pt", "a.png", "--depth", "no/such/depth.png"]
    assert_one_error_line(args, "argument --depth: no such file: 'no/such/depth.png'", capsys)


def assert_one_error_line(args: list[str], message: str, capsys) -> None:
    """Parsing `args` stops with exit status 2 and one error line holding `message`."""
    with pytest.raises(SystemExit) as stopped:
        main.build_parser().parse_args(args)
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0]


def test_inputs_are_stored_in_one_order():
    args = main.build_parser().parse_args(["train", "--inputs", "depth", "rgb"])
    assert args.inputs == ["rgb", "depth"]


# ----------------------------------------------------------------------------------------
# The real depth format


def test_depth_png_reads_in_512ths_of_a_meter_with_65535_as_no_reading(tmp_path):
    values = np.array([[512, 1280, 65535], [0, 5120, 65534]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")  # a 16-bit grayscale PNG, as the real ones
    raw = depth.read_depth(tmp_path / "d.png")
    assert raw.shape == (1, 2, 3) and raw.dtype == torch.int32
    meters = depth.depth_meters(raw)[0]
    assert meters[0, 0] == 1.0 and meters[0, 1] == 2.5 and meters[1, 1] == 10.0
    assert torch.isnan(meters[0, 2]) and not torch.isnan(meters[1, 2])
    # The loader's channel: 4 cm steps, 0 only for "no reading", far readings clamped.
    channel = depth.encode_depth(raw)[0]
    assert channel.tolist() == [[25, 62, 0], [1, 250, 255]]


def test_a_color_png_is_not_taken_for_depth(synthetic_root):
    frame = data.list_frames(synthetic_root, ["1"])[0]
    with pytest.raises(data.DataError, match="not a depth image: expected a 16-bit"):
        depth.read_depth(frame.rgb_path)


def test_synthetic_depth_is_in_the_real_format_with_holes_where_scanners_have_them(
    synthetic_root,
):
    frames = data.list_frames(synthetic_root, ["1", "2", "5a"])
    label_table = data.load_label_table(synthetic_root / data.LABELS_FILE)
    no_label_seen = window_seen = 0
    for frame in frames:
        with Image.open(frame.depth_path) as picture:
            assert picture.mode == "I;16" and picture.size == (64, 64)
        raw = depth.read_depth(frame.depth_path)[0]
        readings = raw[raw != depth.NO_READING].double() / depth.DEPTH_UNITS_PER_METER
        assert readings.numel() > 0
        assert readings.min() >= synthetic.NEAR_PLANE and readings.max() <= synthetic.MAX_RANGE
        # Where the scan has no label (#0D0D0D) it has no depth either.
        semantic = data.read_png(frame.semantic_path)
        no_label = (semantic == 13).all(dim=0)
        assert (raw[no_label] == depth.NO_READING).all()
        no_label_seen += int(no_label.sum())
        class_ids = data.decode_semantic(semantic, label_table)
        window = class_ids == data.CLASSES.index("window")
        window_seen += int((raw[window] == depth.NO_READING).sum())
    assert no_label_seen > 0 and window_seen > 0


def test_z_depth_of_a_flat_wall_facing_the_camera_is_constant():
    values = synthetic.depth_png_values(np.full((4, 4), 2.0), np.zeros((4, 4), dtype=bool))
    assert (values == 1024).all()
    far = synthetic.depth_png_values(np.full((2, 2), synthetic.MAX_RANGE + 0.1), np.eye(2) > 0)
    assert (far == depth.NO_READING).all()


# ----------------------------------------------------------------------------------------
# Transforms keep holes holes


def rgbd_sample(size: int = 48) -> depth.RGBDImage:
    """Random colors, and a depth channel alternating readings and holes in 3x3 blocks."""
    generator = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)
    readings = torch.randint(1, 256, (1, size, size), dtype=torch.uint8, generator=generator)
    blocks = (torch.arange(size) // 3)[:, None] + (torch.arange(size) // 3)[None, :]
    channel = readings.masked_fill((blocks % 2 == 0)[None], 0)
    return depth.RGBDImage(torch.cat([rgb, channel]))


@pytest.mark.parametrize(
    "transform",
    [
        data.train_transforms(20),
        data.train_transforms(96),
        data.eval_transforms(17),
        data.eval_transforms(100),
    ],
)
def test_geometric_transforms_never_blend_a_depth_reading_with_a_hole(transform):
    sample = rgbd_sample()
    mask = tv_tensors.Mask(torch.zeros(3, 48, 48, dtype=torch.uint8))
    for seed in range(5):
        torch.manual_seed(seed)
        moved, _ = transform(sample, mask)
        assert isinstance(moved, depth.RGBDImage) and moved.shape[0] == 4
        channel = moved[3]
        # Every depth value out is one that went in: no blend of readings or with holes.
        assert set(channel.unique().tolist()) <= set(sample[3].unique().tolist())
        assert (channel == 0).any() and (channel > 0).any()


def test_resizing_rgbd_resizes_colors_as_an_image_and_depth_by_nearest():
    sample = rgbd_sample()
    resized = data.eval_transforms(20)(sample, tv_tensors.Mask(torch.zeros(48, 48)))[0]
    plain = sample.as_subclass(torch.Tensor)
    assert torch.equal(resized[:3], F.resize_image(plain[:3], [20, 20], antialias=True))
    nearest = F.resize_image(plain[3:], [20, 20], F.InterpolationMode.NEAREST_EXACT)
    assert torch.equal(resized[3:], nearest)


def test_color_jitter_leaves_depth_alone_and_holes_reach_the_network_as_invalid():
    images = torch.stack([rgbd_sample(), rgbd_sample()]).as_subclass(torch.Tensor)
    torch.manual_seed(0)
    jittered = main.network_input(images, jitter=0.5)
    torch.manual_seed(0)
    expected_rgb = data.normalize(data.jitter_colors(images[:, :3].contiguous(), 0.5))
    assert jittered.shape == (2, 5, 48, 48)
    assert torch.allclose(jittered[:, :3], expected_rgb)
    assert torch.equal(jittered[:, 3:], depth.depth_features(images[:, 3:]))
    holes = images[:, 3] == 0
    assert (jittered[:, 4][holes] == 0).all() and (jittered[:, 4][~holes] == 1).all()
    assert (jittered[:, 3][holes] == 0).all()
    meters = images[:, 3][~holes].float() * depth.DEPTH_STEP
    standardized = (meters - depth.DEPTH_MEAN) / depth.DEPTH_STD
    assert torch.allclose(jittered[:, 3][~holes], standardized)


def test_depth_dataset_moves_depth_with_the_image(synthetic_root):
    plain = depth.DepthDataset(synthetic_root, ["1"])
    flipped = depth.DepthDataset(synthetic_root, ["1"], T.RandomHorizontalFlip(p=1.0))
    image, mask = plain[0]
    flipped_image, flipped_mask = flipped[0]
    assert image.shape == (4, 64, 64) and image.dtype == torch.uint8
    assert torch.equal(flipped_image, image.flip(-1)) and torch.equal(flipped_mask, mask.flip(-1))
    channel = depth.read_depth_channel(plain.frames[0].depth_path)
    assert torch.equal(image[3:], channel)
    assert torch.equal(image[:3], data.StanfordDataset(synthetic_root, ["1"])[0][0])


def test_a_missing_depth_file_names_itself(synthetic_root, tmp_path):
    root = tmp_path / "copy"
    synthetic.generate(root, ["1"], images_per_area=2, size=32, seed=0, progress=False)
    frame = data.list_frames(root, ["1"])[0]
    frame.depth_path.unlink()
    with pytest.raises(data.DataError, match=f"{frame.depth_path.name} is missing"):
        depth.DepthDataset(root, ["1"])[0]


# ----------------------------------------------------------------------------------------
# Models and the cache


def test_widened_first_conv_keeps_the_rgb_filters_and_starts_depth_from_their_mean():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=True)
    wide = models.widen_first_conv(conv, 5)
    assert wide.in_channels == 5 and wide.stride == conv.stride
    assert torch.equal(wide.weight[:, :3], conv.weight) and torch.equal(wide.bias, conv.bias)
    for channel in (3, 4):
        assert torch.allclose(wide.weight[:, channel], conv.weight.mean(dim=1))
    model = models.build_model("lraspp_mobilenet_v3_large", 14, cin=5).eval()
    assert model.net.backbone["0"][0].in_channels == 5
    assert model(torch.zeros(1, 5, 64, 64)).shape == (1, 14, 64, 64)


def test_cache_with_depth_equals_the_rgbd_samples(synthetic_root, tmp_path):
    cache.write_cache(synthetic_root, tmp_path / "c", 32, ["1"], with_depth=True, progress=False)
    cached = cache.open_dataset(tmp_path / "c", ["1"], inputs=["rgb", "depth"])
    raw = depth.DepthDataset(synthetic_root, ["1"], data.eval_transforms(32))
    for index in (0, len(raw) - 1):
        assert torch.equal(cached[index][0], raw[index][0])
        assert torch.equal(cached[index][1], raw[index][1])
    # The same cache serves an RGB model; an RGB cache refuses an RGB-D one.
    rgb_only = cache.open_dataset(tmp_path / "c", ["1"])
    assert torch.equal(rgb_only[0][0], raw[0][0][:3])
    cache.write_cache(synthetic_root, tmp_path / "rgb", 32, ["1"], progress=False)
    with pytest.raises(data.DataError, match="holds no depth.*--depth"):
        cache.open_dataset(tmp_path / "rgb", ["1"], inputs=["rgb", "depth"])


# ----------------------------------------------------------------------------------------
# RGB-D end to end


def test_rgbd_checkpoint_records_its_inputs(rgbd_run):
    checkpoint = torch.load(rgbd_run / "last.pt", weights_only=True)
    assert checkpoint["inputs"] == ["rgb", "depth"]
    assert checkpoint["model_config"]["cin"] == 5


def test_rgbd_predict_finds_depth_by_name_or_takes_it_and_says_when_it_has_none(
    rgbd_run, all_areas_root, tmp_path, capsys
):
    model = ["predict", "--model", str(rgbd_run / "best.pt")]
    frame = data.list_frames(all_areas_root, ["1"])[0]
    assert main.main([*model, str(frame.rgb_path), "--out", str(tmp_path / "a")]) == 0
    with Image.open(tmp_path / "a" / f"{frame.rgb_path.stem}_mask.png") as mask:
        assert mask.size == (64, 64)
    # A picture outside a 2D-3D-S tree: with --depth it works, without it is named.
    photo = tmp_path / "photo.png"
    Image.open(frame.rgb_path).save(photo)
    assert (
        main.main(
            [*model, str(photo), "--depth", str(frame.depth_path), "--out", str(tmp_path / "b")]
        )
        == 0
    )
    assert (tmp_path / "b" / "photo_mask.png").is_file()
    capsys.readouterr()
    assert main.main([*model, str(photo), "--out", str(tmp_path / "c")]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert errors[0].startswith(f"error: {photo}: no depth") and "--depth" in errors[0]
    assert not (tmp_path / "c" / "photo_mask.png").exists()


def test_rgbd_model_is_not_exported_and_depth_is_refused_for_rgb_models(
    rgbd_run, trained_rgb_model, tmp_path, capsys
):
    code = main.main(
        ["export", "--model", str(rgbd_run / "best.pt"), "--out", str(tmp_path / "m.onnx")]
    )
    assert code == 2 and not (tmp_path / "m.onnx").exists()
    assert "trained with depth" in capsys.readouterr().err
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(photo)
    args = ["predict", "--model", str(trained_rgb_model), str(photo), "--depth", str(photo)]
    assert main.main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "reads RGB only" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_rgb_model(synthetic_root, tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("rgb")
    args = ["train", "--datadir", str(synthetic_root), "--areas", "1", "--val-areas", "2"]
    args += ["--epochs", "1", "--batch-size", "2", "--workers", "0", "--device", "cpu"]
    args += ["--logdir", str(logdir), "--name", "rgb", *TINY_MODEL]
    assert main.main(args) == 0
    return logdir / "rgb" / "best.pt"
