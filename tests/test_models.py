"""Tests for models.py: block shapes, any input size, the registry, configs, formats."""

from __future__ import annotations

import functools
import json
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import (
    MobileNet_V3_Large_Weights,
    ResNet50_Weights,
    mobilenet_v3_large,
    resnet50,
    segmentation,
)

import data
import models
from seglab import checkpoints, downloads

# Small enough to run forward and backward in milliseconds on a CPU.
TINY_UNET = {"num_blocks": 2, "base_chan": 4}
# Cheap options per registry model; the torchvision models have no size options.
CHEAP_OPTIONS = {"unet": {"num_blocks": 3, "base_chan": 8}}


def tiny_unet(num_classes: int = 5) -> models.UNet:
    torch.manual_seed(0)
    return models.UNet(num_classes, **TINY_UNET)


def test_conv_block_pools_and_returns_features_before_pooling():
    block = models.UNetConvBlock(3, 8)
    pooled, features = block(torch.randn(2, 3, 32, 64))
    assert pooled.shape == (2, 8, 16, 32)
    assert features.shape == (2, 8, 32, 64)
    torch.testing.assert_close(pooled, F.max_pool2d(features, 2))


def test_handout_layer_names():
    block = models.UNetConvBlock(3, 8)
    assert [type(layer) for layer in block.block1] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d]
    assert isinstance(block.block3, nn.MaxPool2d)
    encoder = models.UNetEncoder(3, 2, base_chan=4)
    assert [type(layer) for layer in encoder.last_block] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d]
    up_block = models.UNetUpConvBlock(16, 8)
    assert isinstance(up_block.upconv[0], nn.Upsample)
    assert len(up_block.convblock) == 6
    decoder = models.UNetDecoder(16, 2, 5)
    assert decoder.first_block[0].out_channels == 16
    assert decoder.last_conv.kernel_size == (1, 1)


def test_encoder_shapes_from_the_handout():
    encoder = models.UNetEncoder(12, 3)
    outputs, features = encoder(torch.randn(2, 12, 32, 64))
    assert encoder.cout == 512
    assert outputs.shape == (2, 512, 4, 8)
    assert [f.shape for f in features] == [
        (2, 64, 32, 64),
        (2, 128, 16, 32),
        (2, 256, 8, 16),
    ]


def test_up_block_doubles_size_and_sets_channels():
    up_block = models.UNetUpConvBlock(512, 256)
    out = up_block(torch.randn(2, 512, 4, 8), torch.randn(2, 256, 8, 16))
    assert out.shape == (2, 256, 8, 16)


def test_decoder_mirrors_the_encoder():
    encoder = models.UNetEncoder(12, 3)
    decoder = models.UNetDecoder(encoder.cout, 3, num_classes=14)
    outputs, features = encoder(torch.randn(2, 12, 32, 64))
    logits = decoder(outputs, features)
    assert logits.shape == (2, 14, 32, 64)
    up_channels = [block.convblock[0].out_channels for block in decoder.blocks]
    assert up_channels == [256, 128, 64]


def test_decoder_rejects_wrong_number_of_feature_maps():
    decoder = models.UNetDecoder(16, 2, num_classes=3)
    with pytest.raises(ValueError, match="num_blocks"):
        decoder(torch.randn(1, 16, 2, 2), [torch.randn(1, 4, 8, 8)])


def test_handout_unet_parameter_count():
    with torch.device("meta"):
        model = models.UNet(14)
    assert models.count_parameters(model) == pytest.approx(34.5e6, rel=0.005)


def test_handout_unet_keeps_an_odd_input_size():
    # The meta device checks the shapes of the full-size UNet without computing anything.
    with torch.device("meta"):
        model = models.UNet(14)
        logits = model(torch.empty(1, 3, 250, 333))
    assert logits.shape == (1, 14, 250, 333)


@pytest.mark.parametrize("height, width", [(250, 333), (17, 5), (1, 1), (32, 48)])
def test_unet_any_input_size(height, width):
    logits = tiny_unet()(torch.randn(2, 3, height, width))
    assert logits.shape == (2, 5, height, width)


def test_unet_crops_the_padding_below_and_right():
    # Padding goes below and to the right: the logits of a 14x13 image equal the top-left
    # corner of the logits of the same image padded the same way to 16x16 beforehand.
    model = tiny_unet().eval()
    images = torch.randn(1, 3, 14, 13)
    padded = F.pad(images, (0, 3, 0, 2), mode="replicate")
    torch.testing.assert_close(model(images), model(padded)[..., :14, :13])


def test_unet_rejects_bad_images():
    model = tiny_unet()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_unet_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        models.UNet(14, num_blocks=0)


def test_gradients_reach_every_parameter():
    model = tiny_unet()
    images = torch.randn(2, 3, 20, 24)
    targets = torch.randint(0, 5, (2, 20, 24))
    # Cross-entropy rather than logits.sum(): a gradient constant over the batch vanishes
    # through a BatchNorm in training mode and would starve the earlier layers.
    F.cross_entropy(model(images), targets).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", models.available_models())
def test_registry_model_forward_backward(name):
    torch.manual_seed(0)
    model = models.build_model(name, 3, **CHEAP_OPTIONS.get(name, {}))
    logits = model(torch.randn(2, 3, 64, 64))
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, 3, 64, 64)
    F.cross_entropy(logits, torch.randint(0, 3, (2, 64, 64))).backward()
    grads = [param.grad for param in model.parameters()]
    assert all(grad is not None for grad in grads)


def test_registry_has_unet_and_a_torchvision_model():
    names = models.available_models()
    assert "unet" in names
    assert "deeplabv3_resnet50" in names
    assert "lraspp_mobilenet_v3_large" in names


@pytest.mark.parametrize("name", models.available_models())
def test_config_round_trips_through_json(name):
    config = models.model_config(name, 7, **CHEAP_OPTIONS.get(name, {}))
    assert all(type(value) in (str, int, float, bool) for value in config.values())
    stored = json.loads(json.dumps(config))
    assert stored == config
    with torch.device("meta"):
        first = models.build_model(**config).state_dict()
        rebuilt = models.build_model(**stored).state_dict()
    assert list(rebuilt) == list(first)
    assert [t.shape for t in rebuilt.values()] == [t.shape for t in first.values()]


def test_config_fills_in_defaults():
    assert models.model_config("unet", 14) == {
        "name": "unet",
        "num_classes": 14,
        "num_blocks": 4,
        "base_chan": 64,
        "cin": 3,
    }
    assert models.model_config("deeplabv3_resnet50", 14)["pretrained"] == "none"


def test_unknown_model_name_lists_available_models():
    with pytest.raises(ValueError, match="unknown model name 'resnet'") as error:
        models.build_model("resnet", 14)
    for name in models.available_models():
        assert name in str(error.value)


def test_unknown_option_names_the_options():
    with pytest.raises(ValueError, match="no option pretrained.*num_blocks, base_chan, cin"):
        models.build_model("unet", 14, pretrained="coco")
    with pytest.raises(ValueError, match="no option base_chan.*pretrained"):
        models.model_config("lraspp_mobilenet_v3_large", 14, base_chan=8)


def test_wrong_option_type_is_an_error():
    with pytest.raises(TypeError, match="'num_blocks'.*int"):
        models.model_config("unet", 14, num_blocks="4")
    with pytest.raises(TypeError, match="'pretrained'.*str"):
        models.model_config("deeplabv3_resnet50", 14, pretrained=True)
    with pytest.raises(ValueError, match="num_classes"):
        models.model_config("unet", 0)


@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "lraspp_mobilenet_v3_large"])
def test_unknown_pretrained_value_names_the_choices(name):
    with pytest.raises(ValueError, match="none, imagenet, coco, got 'voc'"):
        models.build_model(name, 14, pretrained="voc")


@pytest.fixture
def torch_cache(monkeypatch, tmp_path) -> Path:
    """torch's weights cache, moved to an empty tmp folder; a download fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch.hub.get_dir() reads it at each call

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}: its file is not in the cache")

    # load_state_dict_from_url downloads only when the file is missing from the cache.
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    assert cache.is_relative_to(tmp_path)
    return cache


@pytest.fixture
def hash_checks(torch_cache, monkeypatch) -> list[tuple[Path, str]]:
    """For the tests that place their own weights under torchvision's file names: those
    cannot hash to the published prefix, so the hash check only records what it was asked
    to check (its own tests are below, with files whose names carry their real hash)."""
    checked: list[tuple[Path, str]] = []
    monkeypatch.setattr(downloads, "check_hash_prefix", lambda *call: checked.append(call))
    return checked


def place_weights(cache: Path, weights, net: nn.Module) -> dict[str, torch.Tensor]:
    """Save a state dict shaped like net's under the file name torchvision loads weights from.

    Every float tensor is drawn from [2, 3), which PyTorch's default initialisation of a
    new conv or BatchNorm never reaches, so a built model's tensor that holds such values
    came from this file and one that holds none did not.
    """
    generator = torch.Generator().manual_seed(0)
    state = {
        key: torch.rand(value.shape, generator=generator) + 2
        if value.is_floating_point()
        else torch.zeros(value.shape, dtype=value.dtype)
        for key, value in net.state_dict().items()
    }
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(state, cache / Path(urlparse(weights.url).path).name)
    return state


# Per model: torchvision's COCO weights, the torchvision model they fit (21 VOC classes, and
# DeepLabV3's auxiliary head) and the layers that "coco" replaces for our classes.
COCO_STARTS = [
    pytest.param(
        "deeplabv3_resnet50",
        segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
        functools.partial(segmentation.deeplabv3_resnet50, num_classes=21, aux_loss=True),
        ("classifier.4.",),
        id="deeplabv3_resnet50",
    ),
    pytest.param(
        "lraspp_mobilenet_v3_large",
        segmentation.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
        functools.partial(segmentation.lraspp_mobilenet_v3_large, num_classes=21),
        ("classifier.low_classifier.", "classifier.high_classifier."),
        id="lraspp_mobilenet_v3_large",
    ),
]


@pytest.mark.parametrize("name, weights, coco_builder, new_layers", COCO_STARTS)
def test_coco_start_keeps_all_but_the_last_layers(
    torch_cache, hash_checks, name, weights, coco_builder, new_layers
):
    # On the meta device the models only give the keys and shapes, without initialising.
    with torch.device("meta"):
        coco_net = coco_builder(weights=None, weights_backbone=None)
        scratch = models.build_model(name, 14).net.state_dict()
    placed = place_weights(torch_cache, weights, coco_net)
    model = models.build_model(name, 14, pretrained="coco")
    file_name = Path(urlparse(weights.url).path).name
    assert hash_checks == [(torch_cache / file_name, file_name.rsplit("-", 1)[1].split(".")[0])]
    state = model.net.state_dict()
    # The layers of a model built from scratch, so its checkpoints load as any other.
    assert {key: value.shape for key, value in state.items()} == {
        key: value.shape for key, value in scratch.items()
    }
    assert all(key.startswith("aux_classifier.") for key in set(placed) - set(state))
    for key, value in state.items():
        if key.startswith(new_layers):
            assert value.shape[0] == 14 and (value < 2).all(), key
        else:
            assert torch.equal(value, placed[key]), key
    outputs = model.net.eval()(torch.rand(1, 3, 32, 32))
    assert list(outputs) == ["out"]
    assert outputs["out"].shape == (1, 14, 32, 32)


# Per model: the ImageNet weights of its backbone, the classification model they fit, the
# prefix of the backbone's keys in that model and the prefix of its classifier, left out.
IMAGENET_STARTS = [
    pytest.param(
        "deeplabv3_resnet50", ResNet50_Weights.IMAGENET1K_V1, resnet50, "", "fc.", id="resnet50"
    ),
    pytest.param(
        "lraspp_mobilenet_v3_large",
        MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        mobilenet_v3_large,
        "features.",
        "classifier.",
        id="mobilenet_v3_large",
    ),
]


@pytest.mark.parametrize("name, weights, imagenet_builder, prefix, head", IMAGENET_STARTS)
def test_imagenet_start_loads_the_backbone_only(
    torch_cache, hash_checks, name, weights, imagenet_builder, prefix, head
):
    with torch.device("meta"):
        imagenet_net = imagenet_builder(weights=None)
    placed = place_weights(torch_cache, weights, imagenet_net)
    state = models.build_model(name, 14, pretrained="imagenet").net.state_dict()
    placed_key = {
        "backbone." + key.removeprefix(prefix): key for key in placed if not key.startswith(head)
    }
    backbone = {key for key in state if key.startswith("backbone.")}
    assert backbone == set(placed_key)
    for key, value in state.items():
        if key in backbone:
            assert torch.equal(value, placed[placed_key[key]]), key
        else:
            assert (value < 2).all(), key


@pytest.mark.parametrize("old_value", [False, True])
def test_checkpoint_with_a_boolean_pretrained_still_loads(torch_cache, old_value):
    # pretrained used to be a bool, stored so in the checkpoints' model configs.
    model = models.build_model("lraspp_mobilenet_v3_large", data.NUM_CLASSES)
    checkpoint = {
        "classes": list(data.CLASSES),
        "model_config": {
            "name": "lraspp_mobilenet_v3_large",
            "num_classes": data.NUM_CLASSES,
            "pretrained": old_value,
        },
        "model_state": model.state_dict(),
    }
    loaded = checkpoints.model_from_checkpoint(checkpoint, "old.pt")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


class DictModel(nn.Module):
    """Stands in for a torchvision segmentation model: returns a dict of outputs."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": images * 2, "aux": images}


def test_torchvision_model_output_is_the_out_entry():
    model = models.TorchvisionSegmentation(DictModel())
    images = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(images), images * 2)


def test_deeplab_batch_of_one_in_training_is_a_clear_error():
    model = models.TorchvisionSegmentation(DictModel(), min_train_batch=2)
    with pytest.raises(ValueError, match="at least 2 images"):
        model(torch.randn(1, 3, 8, 8))
    assert model.eval()(torch.randn(1, 3, 8, 8)).shape == (1, 3, 8, 8)


def test_channels_last_gives_the_same_logits():
    model = tiny_unet().eval()
    images = torch.randn(2, 3, 20, 28)
    expected = model(images)
    model = model.to(memory_format=torch.channels_last)
    logits = model(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_autocast_bfloat16_keeps_the_shape():
    model = tiny_unet()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(1, 3, 12, 10))
    assert logits.shape == (1, 5, 12, 10)
    assert logits.dtype == torch.bfloat16


def test_command_line_summary(capsys):
    models.main(["--model", "unet", "--img-size", "40", "--num-blocks", "2", "--base-chan", "4"])
    out = capsys.readouterr().out
    assert "output shape: (1, 14, 40, 40)" in out
    assert "parameters:" in out
    assert "forward GFLOP per image:" in out


def test_command_line_rejects_an_option_the_model_lacks(capsys):
    with pytest.raises(SystemExit):
        models.main(["--model", "lraspp_mobilenet_v3_large", "--num-blocks", "2"])
    assert "no option num_blocks" in capsys.readouterr().err


class NotATensor:
    """A Python object in a weights file: reading it would run code from the file."""


class RunsCode:
    """Unpickling this would create the file `path`: proof that code from the file ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_poisoned_file_in_the_weights_cache_is_refused_unread(torch_cache, tmp_path):
    weights = segmentation.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1
    torch_cache.mkdir(parents=True)
    cached = torch_cache / Path(urlparse(weights.url).path).name
    ran = tmp_path / "code-ran"
    torch.save({"payload": RunsCode(ran)}, cached)
    with pytest.raises(downloads.DownloadError) as error:
        models.build_model("lraspp_mobilenet_v3_large", 14, pretrained="coco")
    message = str(error.value)
    assert f"refused to load {cached}" in message and "delete it" in message
    assert "weights_only" not in message and "\n" not in message
    assert not ran.exists()


class PublishedWeights:
    """Stands in for a torchvision Weights entry whose file is already in the cache."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get_state_dict(self, **kwargs) -> dict:
        return torch.hub.load_state_dict_from_url(self.url, **kwargs)


def save_under_its_hash(state: dict, folder: Path, stem: str) -> Path:
    """torch.save `state` to folder/STEM-<first 8 hex digits of its SHA-256>.pth."""
    folder.mkdir(parents=True, exist_ok=True)
    draft = folder / "draft"
    torch.save(state, draft)
    digest = downloads.file_sha256(draft)
    return draft.rename(folder / f"{stem}-{digest[:8]}.pth")


def test_a_cached_file_that_matches_its_hash_loads_with_plain_data_only(torch_cache, tmp_path):
    state = {"weight": torch.arange(6.0).view(2, 3)}
    good = save_under_its_hash(state, torch_cache, "tiny")
    loaded = models.published_state(PublishedWeights(f"https://example.org/m/{good.name}"))
    assert torch.equal(loaded["weight"], state["weight"])
    # Even a file whose name carries its own hash is read with weights_only=True.
    ran = tmp_path / "code-ran"
    poisoned = save_under_its_hash({"payload": RunsCode(ran)}, torch_cache, "poisoned")
    with pytest.raises(downloads.DownloadError, match=f"refused to load {poisoned}") as error:
        models.published_state(PublishedWeights(f"https://example.org/m/{poisoned.name}"))
    assert "weights_only" not in str(error.value) and not ran.exists()


def test_weights_that_cannot_be_downloaded_say_where_to_put_them(torch_cache, monkeypatch):
    def unreachable(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    expected = torch_cache / Path(urlparse(ResNet50_Weights.IMAGENET1K_V1.url).path).name
    with pytest.raises(downloads.DownloadError, match=f"no network.*copy that file to {expected}"):
        models.build_model("deeplabv3_resnet50", 14, pretrained="imagenet")
