"""data.py and synthetic.py: label decoding, areas, errors, transforms, splits, loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import REAL_LABELS
from PIL import Image
from torchvision import tv_tensors

import data
from seglab import check, explore, runstate, synthetic

# One label of each class, in the real form class_instance_roomType_roomNum_areaNum.
LABELS = ["<UNK>_0_<UNK>_0_0"] + [f"{name}_1_office_1_1" for name in data.CLASSES[1:]]


def encode(label_index: np.ndarray) -> np.ndarray:
    """The official encoding: label index -> (R, G, B) with index = R * 65536 + G * 256 + B."""
    return np.stack(
        [(label_index >> 16) & 255, (label_index >> 8) & 255, label_index & 255], axis=-1
    ).astype(np.uint8)


def write_frame(root: Path, area: str, name: str, rgb: np.ndarray, semantic: np.ndarray) -> None:
    rgb_dir = root / f"area_{area}" / "data" / "rgb"
    semantic_dir = root / f"area_{area}" / "data" / "semantic"
    rgb_dir.mkdir(parents=True, exist_ok=True)
    semantic_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(rgb_dir / f"{name}_domain_rgb.png")
    Image.fromarray(semantic).save(semantic_dir / f"{name}_domain_semantic.png")


def make_tree(root: Path, areas=("1",), frames_per_area: int = 2, size: int = 32) -> Path:
    """A hand-made tree: frame k of an area shows class stripes and its rgb encodes the class."""
    (root / "assets").mkdir(parents=True, exist_ok=True)
    (root / "assets" / "semantic_labels.json").write_text(json.dumps(LABELS))
    for area in areas:
        for k in range(frames_per_area):
            classes = (np.arange(size)[None, :] // 4 + k) % data.NUM_CLASSES
            classes = np.broadcast_to(classes, (size, size))
            rgb = np.stack([classes * 18, 255 - classes * 18, np.full_like(classes, 77)], axis=-1)
            name = f"camera_{k:032x}_office_{k + 1}_frame_0"
            write_frame(root, area, name, rgb.astype(np.uint8), encode(classes))
    return root


def test_decoding_of_every_class_unknown_color_and_out_of_range(tmp_path):
    label_table = data.load_label_table(make_tree(tmp_path) / "assets/semantic_labels.json")
    indices = np.array([list(range(len(LABELS))) + [0x0D0D0D, len(LABELS), 2**24 - 1]])
    semantic = torch.from_numpy(encode(indices)).permute(2, 0, 1)
    decoded = data.decode_semantic(semantic, label_table)
    expected = list(range(data.NUM_CLASSES)) + [0, 0, 0]
    assert decoded.tolist() == [expected]
    assert decoded.dtype == torch.uint8


def test_dataset_sample_types_and_values(tmp_path):
    dataset = data.StanfordDataset(make_tree(tmp_path), areas=["1"])
    image, mask = dataset[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert mask.shape == (32, 32) and mask.dtype == torch.uint8
    expected = (torch.arange(32)[None, :] // 4 + 1) % data.NUM_CLASSES
    assert torch.equal(mask, expected.expand(32, 32).to(torch.uint8))
    assert dataset.frames[1].area == "1" and dataset.frames[1].room == "office_2"


@pytest.mark.skipif(
    not REAL_LABELS.is_file(), reason="the real label file is not beside the project"
)
def test_real_label_file_has_exactly_the_classes():
    labels = json.loads(REAL_LABELS.read_text())
    assert len(labels) == 9816
    assert sorted({data.CLASSES[data.class_index_of_label(label)] for label in labels}) == sorted(
        data.CLASSES
    )
    table = data.load_label_table(REAL_LABELS)
    assert table[0] == 0 and table[-1] == 0 and len(table) == len(labels) + 1
    assert data.CLASSES[table[labels.index("beam_10_hallway_6_1")]] == "beam"


def test_area_spellings(tmp_path):
    root = make_tree(tmp_path, areas=("1", "5a", "5b"), frames_per_area=1)
    assert data.resolve_areas(root, ["5"]) == ["5a", "5b"]
    assert data.resolve_areas(root, ["area_1", 1]) == ["1"]
    assert data.resolve_areas(root, None) == ["1", "5a", "5b"]
    assert len(data.StanfordDataset(root, ["5"])) == 2


def test_unknown_and_absent_areas_are_named(tmp_path):
    root = make_tree(tmp_path, areas=("1", "2"), frames_per_area=1)
    with pytest.raises(data.DataError, match=r"area '7' not found.*areas found: 1, 2"):
        data.StanfordDataset(root, ["7"])
    with pytest.raises(data.DataError, match="area '3' not found"):
        data.StanfordDataset(root, ["1", "3"])


def test_missing_datadir_says_how_to_get_data(tmp_path):
    with pytest.raises(data.DataError, match="seglab.synthetic --out"):
        data.StanfordDataset(tmp_path / "nowhere")


def test_missing_semantic_file_is_named(tmp_path):
    root = make_tree(tmp_path)
    missing = next((root / "area_1/data/semantic").iterdir())
    missing.unlink()
    with pytest.raises(data.DataError, match=missing.name):
        data.StanfordDataset(root)


def test_truncated_png_is_named(tmp_path):
    root = make_tree(tmp_path)
    dataset = data.StanfordDataset(root)
    path = dataset.frames[0].rgb_path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(data.DataError, match=path.name):
        dataset[0]


@pytest.mark.parametrize("decoder", ["pyspng", "torchvision"])
def test_read_png_gives_pil_pixels_in_every_png_flavour(tmp_path, monkeypatch, decoder):
    if decoder == "pyspng" and data.pyspng is None:
        pytest.skip("pyspng has no wheel for this platform; data.py decodes with torchvision")
    if decoder == "torchvision":
        monkeypatch.setattr(data, "pyspng", None)
    rng = np.random.default_rng(0)
    colors = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    for mode in ("RGB", "RGBA", "L", "P"):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(colors).convert(mode).save(path)
        pixels = data.read_png(path)
        expected = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 30, 20), mode
        assert np.array_equal(pixels.numpy(), expected), mode


def test_size_mismatch_is_named(tmp_path):
    root = make_tree(tmp_path)
    dataset = data.StanfordDataset(root)
    frame = dataset.frames[0]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(frame.semantic_path)
    with pytest.raises(data.DataError, match=frame.semantic_path.name):
        dataset[0]


def test_bad_label_file_is_named(tmp_path):
    root = make_tree(tmp_path)
    (root / "assets/semantic_labels.json").write_text('["<UNK>_0_<UNK>_0_0", "piano_1_x_1_1"]')
    with pytest.raises(data.DataError, match="semantic_labels.json.*piano"):
        data.StanfordDataset(root)


def class_from_rgb(image: torch.Tensor) -> torch.Tensor:
    """Invert the rgb coding of make_tree: red = class * 18."""
    return (image[0].float() / 18).round().long()


def test_train_transforms_keep_image_and_mask_aligned(tmp_path):
    root = make_tree(tmp_path, size=64)
    transforms = data.train_transforms(96, scale=(0.2, 1.0))
    dataset = data.StanfordDataset(root, transforms=transforms)
    torch.manual_seed(0)
    flips = 0
    for _ in range(20):
        image, mask = dataset[0]
        assert image.shape == (3, 96, 96) and mask.shape == (96, 96)
        # Bilinear resizing blends colors at stripe borders: compare away from them, where
        # the two neighbours on each side have the same class.
        inside = torch.ones_like(mask, dtype=torch.bool)
        for shift in (-2, -1, 1, 2):
            inside &= mask == torch.roll(mask, shift, dims=1)
        inside[:, :2] = inside[:, -2:] = False
        agreement = (class_from_rgb(image) == mask)[inside].float().mean().item()
        assert inside.float().mean() > 0.3 and agreement > 0.99
        # Stripes grow left to right (mod 14); after a flip they mostly decrease.
        steps = torch.diff(mask[0].long())
        flips += int((steps < 0).sum() > (steps > 0).sum())
    assert 0 < flips < 20


def test_train_transforms_leave_the_colors_alone():
    image = torch.empty(3, 40, 50, dtype=torch.uint8)
    image[0], image[1], image[2] = 100, 120, 140
    mask = torch.full((40, 50), 3, dtype=torch.uint8)
    transforms = data.train_transforms(32)
    for seed in range(4):
        torch.manual_seed(seed)
        out_image, out_mask = transforms(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert torch.equal(out_image, image[:, :32, :32]) and bool((out_mask == 3).all())


def test_jitter_colors_matches_torchvision_step_by_step():
    images = torch.randint(0, 256, (4, 3, 12, 10), dtype=torch.uint8)
    images[1] = 128  # a gray image: brightness and contrast only
    strength = 0.5
    torch.manual_seed(3)
    jittered = data.jitter_colors(images, strength)
    torch.manual_seed(3)  # the same draw: three factors per image
    factors = 1 + strength * (2 * torch.rand(3, len(images)) - 1)
    assert jittered.shape == images.shape and jittered.dtype == torch.uint8
    for index, image in enumerate(images.float() / 255):
        brightness, contrast, saturation = factors[:, index].tolist()
        expected = TF.adjust_brightness(image, brightness)
        expected = TF.adjust_contrast(expected, contrast)
        expected = TF.adjust_saturation(expected, saturation)
        # torchvision weighs the gray picture with 0.2989 instead of 0.299
        difference = (jittered[index].float() - expected * 255).abs().max().item()
        assert difference <= 1.0, (index, difference)
    assert len({tuple(image.flatten().tolist()) for image in jittered}) == len(images)


def test_jitter_colors_keeps_gray_gray_and_zero_strength_is_identity():
    gray = torch.full((8, 3, 5, 5), 90, dtype=torch.uint8)
    torch.manual_seed(0)
    out = data.jitter_colors(gray, 0.4)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    assert out.float().std(dim=0).max() > 0, "each image draws its own brightness"
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert data.jitter_colors(images, 0.0) is images
    saturated = torch.full((2, 3, 4, 4), 250, dtype=torch.uint8)
    assert data.jitter_colors(saturated, 0.9).min() >= 25, "values clip at 255, never wrap"


def test_eval_transforms_are_deterministic(synthetic_root):
    dataset = data.StanfordDataset(synthetic_root, ["1"], data.eval_transforms(40))
    first, second = dataset[2], dataset[2]
    assert first[0].shape == (3, 40, 40)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    full = data.StanfordDataset(synthetic_root, ["1"], data.eval_transforms(40, resize_mask=False))
    image, mask = full[2]
    assert image.shape == (3, 40, 40) and mask.shape == (64, 64)


def test_room_split_keeps_rooms_whole(synthetic_root):
    frames = data.list_frames(synthetic_root)
    for seed in range(5):
        train_indices, val_indices = data.split_by_room(frames, val_fraction=0.3, seed=seed)
        assert sorted(train_indices + val_indices) == list(range(len(frames)))
        train_rooms = {(frames[i].area, frames[i].room) for i in train_indices}
        val_rooms = {(frames[i].area, frames[i].room) for i in val_indices}
        assert train_rooms and val_rooms and not train_rooms & val_rooms
    assert data.split_by_room(frames, 0.3, 1) == data.split_by_room(frames, 0.3, 1)


def test_subset_is_deterministic_and_spread():
    assert data.subset_indices(10, 5) == [0, 2, 4, 6, 8]
    assert data.subset_indices(3, 10) == [0, 1, 2]
    with pytest.raises(ValueError, match="subset"):
        data.subset_indices(10, 0)


def test_dataloader_batches(synthetic_root):
    train_set, val_set = data.get_datasets(synthetic_root, ["1", "2"], ["5a"], img_size=32)
    train_loader = runstate.training_loader(train_set, 4, workers=0, pin_memory=False, seed=0)
    val_loader = data.make_loader(val_set, batch_size=4)
    images, masks = next(iter(train_loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert masks.shape == (4, 32, 32) and masks.dtype == torch.uint8
    assert masks.min() >= 0 and masks.max() < data.NUM_CLASSES
    assert len(train_loader) == 12 // 4  # drop_last
    assert sum(len(batch[0]) for batch in val_loader) == 6
    normalized = data.normalize(images)
    assert normalized.dtype == torch.float32
    mean, std = torch.tensor(data.MEAN).view(1, 3, 1, 1), torch.tensor(data.STD).view(1, 3, 1, 1)
    assert torch.allclose(normalized * std + mean, images / 255.0, atol=1e-6)


def test_room_split_loaders_without_val_areas(synthetic_root):
    train_set, val_set = data.get_datasets(synthetic_root, ["1", "2"], None, img_size=32)
    train_paths = {train_set.dataset.frames[i].rgb_path for i in train_set.indices}
    val_paths = {val_set.dataset.frames[i].rgb_path for i in val_set.indices}
    assert train_paths and val_paths and not train_paths & val_paths


def test_synthetic_tree_has_the_real_format(synthetic_root):
    labels = json.loads((synthetic_root / "assets/semantic_labels.json").read_text())
    assert labels[0] == "<UNK>_0_<UNK>_0_0"
    assert all(label.count("_") == 4 for label in labels)
    assert {label.rsplit("_", 1)[1] for label in labels[1:]} == {"1", "2", "5"}
    names = sorted(p.name for p in (synthetic_root / "area_1/data/rgb").iterdir())
    assert len(names) == 6
    assert data.FRAME_NAME.match(names[0].removesuffix("_domain_rgb.png"))
    with Image.open(synthetic_root / "area_1/data/rgb" / names[0]) as image:
        assert image.mode == "RGB" and image.size == (64, 64)


def test_synthetic_is_deterministic(tmp_path):
    synthetic.generate(tmp_path / "a", ["3"], images_per_area=2, size=32, seed=5, progress=False)
    synthetic.generate(tmp_path / "b", ["3"], images_per_area=2, size=32, seed=5, progress=False)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.*"))
    assert files_a == files_b
    for path in files_a:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()


def test_synthetic_histogram_and_show_commands(tmp_path, capsys):
    root = tmp_path / "synthetic"
    assert synthetic.main(["--out", str(root), "--areas", "1", "2", "--size", "96"]) == 0
    out = tmp_path / "hist.json"
    assert explore.main(["histogram", "--datadir", str(root), "--out", str(out)]) == 0
    shares = json.loads(out.read_text())["pixel_share"]
    assert all(share > 0 for share in shares), "every class appears over two areas"
    order = sorted(range(1, data.NUM_CLASSES), key=lambda i: -shares[i])
    assert data.CLASSES[order[0]] == "wall"
    assert "sofa" in [data.CLASSES[i] for i in order[-2:]]
    picture = tmp_path / "sample.png"
    show = ["show", "--datadir", str(root), "--areas", "2", "--out", str(picture)]
    assert explore.main(show) == 0
    assert "mask    shape (96, 96) dtype torch.uint8" in capsys.readouterr().out
    with Image.open(picture) as image:
        assert image.size[0] > 300


def test_check_command_reports_bad_files(tmp_path, capsys):
    root = make_tree(tmp_path, frames_per_area=3)
    assert check.main(["--datadir", str(root)]) == 0
    rgb_files = sorted((root / "area_1/data/rgb").iterdir())
    rgb_files[0].write_bytes(rgb_files[0].read_bytes()[: rgb_files[0].stat().st_size // 2])
    semantic = root / "area_1/data/semantic" / rgb_files[1].name.replace("rgb", "semantic")
    semantic.unlink()
    assert check.main(["--datadir", str(root)]) == 1
    out = capsys.readouterr().out
    assert rgb_files[0].name in out and semantic.name in out
