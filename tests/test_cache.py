"""The pre-decoded cache of seglab/cache.py: round trip, refusals, augmentations, training on it."""

from __future__ import annotations

import functools
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image

import data
from seglab import bench, cache, explore

CACHE_SIZE = 32  # the synthetic frames are 64x64: the cache halves them


@pytest.fixture(scope="module")
def cache_root(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c32"
    cache.write_cache(synthetic_root, out, CACHE_SIZE, progress=False)
    return out


def copy_tree(root: Path, out: Path) -> Path:
    shutil.copytree(root, out)
    return out


def write_stripes_tree(root: Path, size: int = 64, frames: int = 3) -> Path:
    """Frames whose red channel tells the class: vertical stripes 8 px wide of classes 1..13
    from left to right, so that a mask flipped or shifted against its image shows."""
    labels = ["<UNK>_0_<UNK>_0_0"] + [f"{name}_1_office_1_1" for name in data.CLASSES[1:]]
    (root / "assets").mkdir(parents=True)
    (root / data.LABELS_FILE).write_text(json.dumps(labels))
    for area in ("1",):
        rgb_dir = root / f"area_{area}" / "data" / "rgb"
        semantic_dir = rgb_dir.parent / "semantic"
        rgb_dir.mkdir(parents=True)
        semantic_dir.mkdir(parents=True)
        for k in range(frames):
            columns = (np.arange(size) // 8 + k) % (data.NUM_CLASSES - 1) + 1
            classes = np.broadcast_to(columns[None, :], (size, size)).astype(np.uint8)
            rgb = np.stack([classes * 18, np.full_like(classes, 50), 255 - classes * 18], -1)
            semantic = np.stack([np.zeros_like(classes), np.zeros_like(classes), classes], -1)
            name = f"camera_{k:032x}_office_1_frame_{k}"
            Image.fromarray(rgb).save(rgb_dir / f"{name}{data.RGB_SUFFIX}")
            Image.fromarray(semantic).save(semantic_dir / f"{name}{data.SEMANTIC_SUFFIX}")
    return root


# ----------------------------------------------------------------------------------------
# Round trip


def test_cached_samples_equal_raw_samples_resized_for_evaluation(synthetic_root, cache_root):
    areas = ["2", "1"]  # not sorted: both keep the requested order
    cached = cache.open_dataset(cache_root, areas)
    raw = data.StanfordDataset(synthetic_root, areas, data.eval_transforms(CACHE_SIZE))
    assert isinstance(cached, cache.CachedDataset)
    assert cached.frames == raw.frames and cached.areas == raw.areas == ["1", "2"]
    for index in range(len(raw)):
        image, mask = cached[index]
        expected_image, expected_mask = raw[index]
        assert image.shape == (3, CACHE_SIZE, CACHE_SIZE) and image.dtype == torch.uint8
        assert mask.shape == (CACHE_SIZE, CACHE_SIZE) and mask.dtype == torch.uint8
        assert torch.equal(image, expected_image) and torch.equal(mask, expected_mask)
        assert torch.equal(cached.label_mask(index), mask)


def test_a_raw_root_still_opens_as_a_stanford_dataset(synthetic_root):
    assert isinstance(cache.open_dataset(synthetic_root, ["1"]), data.StanfordDataset)


def test_get_datasets_on_a_cache_matches_the_raw_splits(synthetic_root, cache_root):
    train_set, val_set = data.get_datasets(
        cache_root, ["1", "2"], ["5a"], img_size=24, open_dataset=cache.open_dataset
    )
    assert isinstance(train_set.dataset, cache.CachedDataset)
    assert (len(train_set), len(val_set)) == (12, 6)
    image, mask = train_set[0]
    assert image.shape == (3, 24, 24) and mask.shape == (24, 24) and mask.dtype == torch.uint8
    # Held-out rooms: the same frames as from the raw tree.
    cached_split = data.get_datasets(
        cache_root, ["1", "2"], img_size=CACHE_SIZE, open_dataset=cache.open_dataset
    )
    raw_split = data.get_datasets(synthetic_root, ["1", "2"], img_size=CACHE_SIZE)
    for cached_subset, raw_subset in zip(cached_split, raw_split, strict=True):
        assert cached_subset.indices == raw_subset.indices
    cached_val, raw_val = cached_split[1], raw_split[1]
    for index in range(len(raw_val)):
        assert all(map(torch.equal, cached_val[index], raw_val[index]))


def test_cached_dataset_pickles_without_its_arrays_and_loads_in_workers(cache_root):
    dataset = cache.CachedDataset(cache_root, ["1"])
    first = dataset[0]
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.arrays_by_area == {} and dataset.arrays_by_area != {}
    assert all(torch.equal(a, b) for a, b in zip(copy[0], first, strict=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=6, num_workers=1)
    images, masks = next(iter(loader))
    assert images.shape == (6, 3, CACHE_SIZE, CACHE_SIZE) and torch.equal(masks[0], first[1])


# ----------------------------------------------------------------------------------------
# Augmentations


def test_train_transforms_on_a_cache_keep_image_and_mask_aligned(tmp_path):
    root = write_stripes_tree(tmp_path / "stripes")
    out = tmp_path / "cache"
    cache.write_cache(root, out, 48, progress=False)
    dataset = cache.CachedDataset(out, transforms=data.train_transforms(32))
    torch.manual_seed(0)
    flipped = 0
    for _ in range(4):
        for index in range(len(dataset)):
            image, mask = dataset[index]
            assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
            assert mask.shape == (32, 32) and mask.dtype == torch.uint8
            class_from_color = (image[0].float() / 18).round().long()
            # Bilinear resizing blends colors across stripe borders only.
            assert (class_from_color == mask).float().mean() > 0.7
            # Classes grow to the right unless the sample was flipped.
            flipped += int(mask[:, 0].float().mean() > mask[:, -1].float().mean())
    assert 0 < flipped < 4 * len(dataset)


def test_color_jitter_on_a_cache_changes_only_the_image(cache_root):
    plain = cache.CachedDataset(cache_root, ["1"])
    jitter = T.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5)
    jittered = cache.CachedDataset(cache_root, ["1"], jitter)
    torch.manual_seed(0)
    image, mask = jittered[0]
    assert not torch.equal(image, plain[0][0]) and torch.equal(mask, plain[0][1])


# ----------------------------------------------------------------------------------------
# Refusals


def test_image_size_larger_than_the_cache_is_refused(cache_root):
    with pytest.raises(data.DataError, match=f"holds {CACHE_SIZE}x{CACHE_SIZE} frames.*--size"):
        opener = functools.partial(cache.open_dataset, img_size=CACHE_SIZE * 2)  # as main.py
        data.get_datasets(cache_root, ["1"], ["2"], img_size=CACHE_SIZE * 2, open_dataset=opener)


def test_area_missing_from_the_cache_is_refused(synthetic_root, tmp_path):
    out = tmp_path / "cache"
    cache.write_cache(synthetic_root, out, 16, areas=["1"], progress=False)
    with pytest.raises(data.DataError, match=r"area '2' is not in the cache .*cached areas: 1"):
        data.get_datasets(out, ["1"], ["2"], img_size=16, open_dataset=cache.open_dataset)


def test_changed_label_file_makes_the_cache_stale(synthetic_root, tmp_path):
    root = copy_tree(synthetic_root, tmp_path / "data")
    out = tmp_path / "cache"
    cache.write_cache(root, out, 16, areas=["1"], progress=False)
    labels = json.loads((root / data.LABELS_FILE).read_text())
    (root / data.LABELS_FILE).write_text(json.dumps([*labels, "chair_99_office_1_1"]))
    with pytest.raises(data.DataError, match="stale.*semantic_labels.json changed.*rebuild"):
        cache.open_dataset(out)
    # Without its source (a cache copied to another machine) the cache is used as it is.
    shutil.rmtree(root)
    assert len(cache.open_dataset(out)) == 6


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "truncated or damaged"),
        ("version", "format version 0, this code reads version 1"),
        ("classes", "made for the classes"),
        ("manifest", "cannot read the cache manifest"),
        ("interrupt", "unfinished cache .*interrupted"),
    ],
)
def test_damaged_or_mismatched_cache_is_refused(synthetic_root, tmp_path, damage, message):
    out = tmp_path / "cache"
    cache.write_cache(synthetic_root, out, 16, areas=["1"], progress=False)
    manifest_path = out / cache.CACHE_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    if damage == "truncate":
        images = out / "area_1" / cache.CACHE_IMAGES
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "version":
        manifest_path.write_text(json.dumps({**manifest, "version": 0}))
    elif damage == "classes":
        manifest_path.write_text(json.dumps({**manifest, "classes": manifest["classes"][:-1]}))
    elif damage == "manifest":
        manifest_path.write_text(manifest_path.read_text()[:50])
    else:
        manifest_path.unlink()
    with pytest.raises(data.DataError, match=message):
        cache.open_dataset(out, ["1"])


def test_interrupted_cache_run_leaves_no_manifest(synthetic_root, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    cache.write_cache(synthetic_root, out, 16, areas=["1"], progress=False)
    load = data.StanfordDataset.load

    def load_then_stop(self, index):
        if index == 3:
            raise KeyboardInterrupt
        return load(self, index)

    monkeypatch.setattr(data.StanfordDataset, "load", load_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cache.write_cache(synthetic_root, out, 16, areas=["1"], progress=False)
    assert not (out / cache.CACHE_MANIFEST).exists()
    with pytest.raises(data.DataError, match="interrupted"):
        cache.open_dataset(out)


def test_unreadable_frame_stops_the_cache_or_is_left_out(synthetic_root, tmp_path):
    root = copy_tree(synthetic_root, tmp_path / "data")
    broken = sorted((root / "area_1" / "data" / "rgb").iterdir())[2]
    broken.write_bytes(b"not a png")
    with pytest.raises(data.DataError, match=f"cannot read {broken}.*seglab.check"):
        cache.write_cache(root, tmp_path / "strict", 16, areas=["1"], progress=False)
    manifest = cache.write_cache(
        root, tmp_path / "lenient", 16, areas=["1"], skip_bad=True, progress=False
    )
    assert manifest["skipped"] == [str(broken)]
    dataset = cache.open_dataset(tmp_path / "lenient")
    assert len(dataset) == 5 and broken not in [frame.rgb_path for frame in dataset.frames]


# ----------------------------------------------------------------------------------------
# Command line and training


def test_cache_command_writes_rewrites_and_protects_other_folders(synthetic_root, tmp_path, capsys):
    out = tmp_path / "cache"
    args = ["write", "--datadir", str(synthetic_root), "--out", str(out), "--size", "16"]
    assert cache.main([*args, "--areas", "1", "2"]) == 0
    assert "wrote 12 frames of areas 1, 2 at 16x16" in capsys.readouterr().out
    assert cache.main([*args, "--areas", "5a"]) == 0  # replaces the earlier cache
    assert sorted(p.name for p in out.iterdir()) == ["area_5a", cache.CACHE_MANIFEST]
    assert cache.open_dataset(out).areas == ["5a"]
    before = sorted(synthetic_root.rglob("*"))
    assert cache.main([*args[:3], "--out", str(synthetic_root), "--size", "16"]) == 2
    assert "not part of a cache" in capsys.readouterr().err
    assert sorted(synthetic_root.rglob("*")) == before


def test_training_on_a_cache_directory(cache_root, tmp_path):
    import main

    logdir = tmp_path / "runs"
    args = [
        "train", "--datadir", str(cache_root), "--areas", "1", "2", "--val-areas", "5a",
        "--epochs", "1", "--batch-size", "4", "--img-size", "24", "--model", "unet",
        "--num-blocks", "2", "--base-chan", "8", "--logdir", str(logdir), "--name", "cached",
        "--device", "cpu", "--workers", "0",
    ]  # fmt: skip
    assert main.main(args) == 0
    run = logdir / "cached"
    assert {"best.pt", "last.pt", "metrics.jsonl"} <= {path.name for path in run.iterdir()}
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["epoch"] == 1

    # The other commands read the cache too: test (at the cached size), show, histogram.
    out = tmp_path / "test"
    assert main.main(["test", "--model", str(run / "best.pt"), "--out", str(out)]) == 0
    scores = json.loads((out / "metrics.json").read_text())
    assert scores["areas"] == ["5a"] and scores["frames"] == 6
    assert sum(scores["support"]) <= 6 * CACHE_SIZE * CACHE_SIZE
    hist = tmp_path / "hist.json"
    assert explore.main(["histogram", "--datadir", str(cache_root), "--out", str(hist)]) == 0
    assert json.loads(hist.read_text())["frames"] == 18
    picture = tmp_path / "show.png"
    assert explore.main(["show", "--datadir", str(cache_root), "--out", str(picture)]) == 0
    assert picture.is_file()


# ----------------------------------------------------------------------------------------
# The benchmark's reference


def test_benchmark_reference_labels_equal_ours(synthetic_root):
    dataset = data.StanfordDataset(synthetic_root, ["1"])
    class_table = bench.naive_class_table(synthetic_root / data.LABELS_FILE)
    for index, frame in enumerate(dataset.frames):
        naive = bench.naive_label_map(frame.semantic_path, class_table)
        assert np.array_equal(naive, dataset.label_mask(index).numpy())


def test_benchmark_equality_checks_hold_on_the_synthetic_tree(synthetic_root, cache_root):
    raw = data.StanfordDataset(synthetic_root)
    checks = bench.check_samples(raw, cache_root, img_size=24, max_frames=4)
    assert len(checks) == 4
    assert [claim for claim, holds in checks if not holds] == []


def test_benchmark_naive_samples_have_the_training_shapes(synthetic_root):
    naive = bench.NaiveDataset(data.StanfordDataset(synthetic_root, ["1"]), img_size=24)
    image, mask = naive[0]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    assert mask.shape == (24, 24) and mask.max() < data.NUM_CLASSES
