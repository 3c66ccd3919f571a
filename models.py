"""Segmentation models: the handout's UNet and stronger torchvision models for going further.

The UNet (Ronneberger et al., 2015) is an encoder-decoder with skip connections:

- The encoder is ``num_blocks`` conv blocks. Each block applies two Conv 3x3 - ReLU - BatchNorm
  layers, hands its feature map to the decoder and max-pools it to half size, while the channel
  count doubles from block to block (``base_chan``, ``2 * base_chan``, ...). A last Conv - ReLU -
  BatchNorm doubles the channels once more at 1 / 2**num_blocks of the input size.
- The decoder mirrors it: each up block upsamples x2, convolves to half the channels,
  concatenates the encoder's feature map of the same size (the skip connection that brings back
  fine detail lost by pooling) and applies two Conv - ReLU - BatchNorm layers. A final 1x1 conv
  gives one logit per class and pixel.

The layers are Conv - ReLU - BatchNorm, in this order, as in the handout.

Input size: every max-pool halves the size, rounding down, and every up block doubles it, and
the concatenation needs the upsampled map to have exactly the size of the encoder's map (LAB.md,
"Input size", and Q9). ``Segmenter`` resizes pictures to sides that suit the model.

Beyond the UNet, ``build_model`` also builds torchvision's DeepLabV3-ResNet50 and
LRASPP-MobileNetV3-Large with a new last layer for our class count, optionally starting from
ImageNet weights for the backbone or from torchvision's COCO segmentation weights. Every model
maps a (B, C, H, W) float image batch to (B, K, H, W) logits; ``Segmenter`` wraps a trained
one for pictures of any size (uint8 in, logits out), as ``main.py predict`` and ``export``
use it.

A model is described by a plain config dict that a checkpoint can store::

    config = model_config("unet", num_classes=14, base_chan=32)
    model = build_model(**config)

Run ``python models.py --model unet --img-size 256`` for a summary of a model: its parameters,
output shape and forward GFLOP per image.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, segmentation

import data
from seglab import cli
from seglab.downloads import published_state  # checked against the hash in its name


class UNetConvBlock(nn.Module):
    """One encoder level: two Conv 3x3 - ReLU - BatchNorm layers, then a 2x2 max-pool."""

    def __init__(self, cin: int, cout: int) -> None:
        # >>> Q5: implement UNetConvBlock.__init__
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(cout),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(cout, cout, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(cout),
        )
        self.block3 = nn.MaxPool2d(kernel_size=2)
        # <<< Q5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, cin, H, W) float -> pooled (B, cout, H/2, W/2) and features (B, cout, H, W)."""
        # >>> Q5: implement UNetConvBlock.forward
        features = self.block2(self.block1(x))
        return self.block3(features), features
        # <<< Q5


class UNetEncoder(nn.Module):
    """``num_blocks`` conv blocks doubling the channels from ``base_chan``, then a last conv."""

    def __init__(self, cin: int, num_blocks: int, base_chan: int = 64) -> None:
        super().__init__()
        channels = [cin] + [base_chan * 2**i for i in range(num_blocks)]
        self.blocks = nn.ModuleList(
            UNetConvBlock(channels[i], channels[i + 1]) for i in range(num_blocks)
        )
        # >>> Q6: build the last block of UNetEncoder
        self.cout = base_chan * 2**num_blocks
        self.last_block = nn.Sequential(
            nn.Conv2d(channels[-1], self.cout, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(self.cout),
        )
        # <<< Q6

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, cin, H, W) float, H and W multiples of 2**num_blocks -> outputs and features.

        outputs: (B, cout, H / 2**num_blocks, W / 2**num_blocks).
        features: one map per block, (B, base_chan * 2**i, H / 2**i, W / 2**i) for block i.
        """
        features = []
        for block in self.blocks:
            x, block_features = block(x)
            features.append(block_features)
        return self.last_block(x), features


class UNetUpConvBlock(nn.Module):
    """One decoder level: upsample x2 and halve the channels, concatenate the skip, two convs."""

    def __init__(self, cin: int, cout: int) -> None:
        # >>> Q7: implement UNetUpConvBlock.__init__
        super().__init__()
        self.upconv = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(cin, cin // 2, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(cin // 2),
        )
        # The concatenation brings the channels back to cin: cin // 2 upsampled + cin // 2 skip.
        self.convblock = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(cout),
            nn.Conv2d(cout, cout, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(cout),
        )
        # <<< Q7

    def forward(self, x: torch.Tensor, encoder_features: torch.Tensor) -> torch.Tensor:
        """(B, cin, h, w) and encoder features (B, cin // 2, 2h, 2w) -> (B, cout, 2h, 2w)."""
        # >>> Q7: implement UNetUpConvBlock.forward
        upsampled = self.upconv(x)
        return self.convblock(torch.cat([upsampled, encoder_features], dim=1))
        # <<< Q7


class UNetDecoder(nn.Module):
    """A first conv, ``num_blocks`` up blocks halving the channels, then a 1x1 conv to logits."""

    def __init__(self, cin: int, num_blocks: int, num_classes: int) -> None:
        # >>> Q8: implement UNetDecoder.__init__
        super().__init__()
        self.first_block = nn.Sequential(
            nn.Conv2d(cin, cin, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(cin),
        )
        channels = [cin // 2**i for i in range(num_blocks + 1)]
        self.blocks = nn.ModuleList(
            UNetUpConvBlock(channels[i], channels[i + 1]) for i in range(num_blocks)
        )
        self.last_conv = nn.Conv2d(channels[-1], num_classes, kernel_size=1)
        # <<< Q8

    def forward(
        self, encoder_outputs: torch.Tensor, encoder_features: list[torch.Tensor]
    ) -> torch.Tensor:
        """Encoder outputs (B, cin, h, w) and its features, finest first -> logits.

        Returns (B, num_classes, h * 2**num_blocks, w * 2**num_blocks) float.
        """
        # >>> Q8: implement UNetDecoder.forward
        if len(encoder_features) != len(self.blocks):
            raise ValueError(
                f"encoder_features has {len(encoder_features)} maps but the decoder has "
                f"{len(self.blocks)} blocks; build encoder and decoder with the same num_blocks"
            )
        x = self.first_block(encoder_outputs)
        # The coarsest encoder map joins the first up block: walk the features backwards.
        for block, features in zip(self.blocks, reversed(encoder_features), strict=True):
            x = block(x, features)
        return self.last_conv(x)
        # <<< Q8


class UNet(nn.Module):
    """The handout's UNet: encoder, decoder, logits at the size of the input (LAB.md, Q9)."""

    def __init__(
        self, num_classes: int, num_blocks: int = 4, cin: int = 3, base_chan: int = 64
    ) -> None:
        super().__init__()
        for arg_name, value in [
            ("num_classes", num_classes),
            ("num_blocks", num_blocks),
            ("cin", cin),
            ("base_chan", base_chan),
        ]:
            if value < 1:
                raise ValueError(f"UNet: {arg_name} must be at least 1, got {value}")
        self.num_blocks = num_blocks
        self.cin = cin
        # Sides that need no padding; models.Segmenter resizes pictures to such sides.
        self.size_multiple = 2**num_blocks
        self.encoder = UNetEncoder(cin, num_blocks, base_chan)
        self.decoder = UNetDecoder(self.encoder.cout, num_blocks, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, cin, H, W) float, any H, W -> logits (B, num_classes, H, W) float.

        Under autocast the logits come out in the autocast dtype (e.g. bfloat16).
        """
        check_images(images, self.cin)
        height, width = images.shape[-2:]
        # >>> Q9 (optional): pad the images to a multiple of 2**num_blocks
        multiple = 2**self.num_blocks
        pad_bottom, pad_right = -height % multiple, -width % multiple
        if pad_bottom or pad_right:
            # Replicating the border keeps the padding close to the image statistics; zeros
            # would add a sharp artificial edge for the first convs to react to.
            images = nn.functional.pad(images, (0, pad_right, 0, pad_bottom), mode="replicate")
        # <<< Q9
        outputs, features = self.encoder(images)
        logits = self.decoder(outputs, features)
        return logits[..., :height, :width]


class TorchvisionSegmentation(nn.Module):
    """Wraps a torchvision segmentation model so that forward returns its plain logits tensor.

    torchvision's models return a dict ``{"out": logits}`` (plus ``"aux"`` with an auxiliary
    head); the rest of the project expects a tensor from every model.
    """

    size_multiple = 32  # the largest stride of their backbones: sides that divide evenly

    def __init__(self, net: nn.Module, min_train_batch: int = 1, cin: int = 3) -> None:
        super().__init__()
        self.net = net
        self.min_train_batch = min_train_batch
        self.cin = cin

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, cin, H, W) float -> logits (B, num_classes, H, W) float."""
        check_images(images, self.cin)
        if self.training and images.shape[0] < self.min_train_batch:
            raise ValueError(
                f"this model needs a batch of at least {self.min_train_batch} images in training "
                f"mode (BatchNorm on its 1x1 image-pooling branch), got {images.shape[0]}; "
                "raise the batch size or call model.eval()"
            )
        return self.net(images)["out"]


def check_images(images: torch.Tensor, channels: int) -> None:
    """Raise a ValueError unless images is a (B, channels, H, W) floating point tensor."""
    if images.dim() != 4 or images.shape[1] != channels:
        raise ValueError(
            f"images must have shape (B, {channels}, H, W), got {tuple(images.shape)}; "
            "add a batch dimension with images.unsqueeze(0) for a single image"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor, got {images.dtype}; convert with images.float()"
        )


# Builders: one function per model. Their keyword defaults are the model's options, so that
# model_config fills them in and checks option names and types from this single place.


def build_unet(num_classes: int, num_blocks: int = 4, base_chan: int = 64, cin: int = 3) -> UNet:
    """The handout's UNet, trained from scratch (about 34.5 M parameters with the defaults)."""
    return UNet(num_classes, num_blocks=num_blocks, cin=cin, base_chan=base_chan)


# Values of the torchvision builders' ``pretrained`` option: no pretrained weights, an ImageNet
# classification backbone, or a whole segmentation model trained on COCO with the VOC labels.
PRETRAINED_CHOICES = ("none", "imagenet", "coco")


def check_pretrained(pretrained: str) -> None:
    """Raise a ValueError naming the choices unless pretrained is in PRETRAINED_CHOICES."""
    if pretrained not in PRETRAINED_CHOICES:
        raise ValueError(
            f"pretrained must be one of {', '.join(PRETRAINED_CHOICES)}, got {pretrained!r}"
        )


def new_last_conv(old: nn.Conv2d, num_classes: int) -> nn.Conv2d:
    """A freshly initialised conv like ``old`` (same input, kernel, bias) for num_classes."""
    return nn.Conv2d(
        old.in_channels,
        num_classes,
        kernel_size=old.kernel_size,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )


def widen_first_conv(conv: nn.Conv2d, cin: int) -> nn.Conv2d:
    """A copy of the RGB conv `conv` taking `cin` >= 3 input channels (e.g. RGB and depth):
    its RGB filters are kept, and the filter of every extra channel starts as their mean, so
    that pretrained weights see a new channel as they would see a gray picture."""
    wide = nn.Conv2d(
        cin,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        mean_filter = conv.weight.mean(dim=1, keepdim=True)
        extra = cin - conv.in_channels
        wide.weight.copy_(torch.cat([conv.weight, mean_filter.expand(-1, extra, -1, -1)], dim=1))
        if conv.bias is not None:
            wide.bias.copy_(conv.bias)
    return wide


def build_deeplabv3_resnet50(num_classes: int, pretrained: str = "none", cin: int = 3) -> nn.Module:
    """DeepLabV3 with a dilated ResNet-50 backbone (about 39.6 M parameters).

    pretrained chooses the starting weights, downloaded once into torch's cache:

    - "none": random weights, trained from scratch.
    - "imagenet": the ResNet-50 backbone from ImageNet classification, the head random.
    - "coco": torchvision's model trained on COCO with the 21 Pascal VOC labels: backbone and
      `classifier.0` to `classifier.3` (ASPP, 3x3 conv, BatchNorm, ReLU) kept, the last 1x1
      conv `classifier.4` new and random for our classes, the auxiliary head dropped.

    The parameter count is the same for every value. Pretrained weights expect images
    normalized with the ImageNet mean and std. `cin` > 3 widens the first conv for extra
    input channels (see widen_first_conv).
    """
    check_pretrained(pretrained)
    coco = pretrained == "coco"
    # The COCO weights hold an auxiliary head: build it to load them, drop it afterwards.
    net = segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=21 if coco else num_classes, aux_loss=coco
    )
    if coco:
        net.load_state_dict(
            published_state(segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1)
        )
        net.aux_classifier = None
        del net.backbone.return_layers["layer3"]  # the features only the auxiliary head read
        net.classifier[4] = new_last_conv(net.classifier[4], num_classes)
    elif pretrained == "imagenet":
        state = published_state(ResNet50_Weights.IMAGENET1K_V1)
        # The backbone is the ResNet without its classifier (`fc`), under the same names.
        net.backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    if cin != 3:
        net.backbone.conv1 = widen_first_conv(net.backbone.conv1, cin)
    return TorchvisionSegmentation(net, min_train_batch=2, cin=cin)


def build_lraspp_mobilenet_v3_large(
    num_classes: int, pretrained: str = "none", cin: int = 3
) -> nn.Module:
    """LR-ASPP with a MobileNetV3-Large backbone: small and fast (about 3.2 M parameters).

    pretrained chooses the starting weights, downloaded once into torch's cache:

    - "none": random weights, trained from scratch.
    - "imagenet": the MobileNetV3-Large backbone from ImageNet classification, the head random.
    - "coco": torchvision's model trained on COCO with the 21 Pascal VOC labels: backbone,
      `classifier.cbr` and `classifier.scale` kept, the two 1x1 convs that output the classes
      (`classifier.low_classifier`, `classifier.high_classifier`) new and random.

    The parameter count is the same for every value. Pretrained weights expect images
    normalized with the ImageNet mean and std. `cin` > 3 widens the first conv for extra
    input channels (see widen_first_conv).
    """
    check_pretrained(pretrained)
    coco = pretrained == "coco"
    net = segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21 if coco else num_classes
    )
    if coco:
        net.load_state_dict(
            published_state(segmentation.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1)
        )
        head = net.classifier
        head.low_classifier = new_last_conv(head.low_classifier, num_classes)
        head.high_classifier = new_last_conv(head.high_classifier, num_classes)
    elif pretrained == "imagenet":
        state = published_state(MobileNet_V3_Large_Weights.IMAGENET1K_V1)
        # The backbone is the network's `features`, under the names inside it.
        features = {
            k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")
        }
        net.backbone.load_state_dict(features)
    if cin != 3:
        first = net.backbone["0"]  # Conv2dNormActivation: conv, BatchNorm, Hardswish
        first[0] = widen_first_conv(first[0], cin)
    return TorchvisionSegmentation(net, cin=cin)


MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "unet": build_unet,
    "deeplabv3_resnet50": build_deeplabv3_resnet50,
    "lraspp_mobilenet_v3_large": build_lraspp_mobilenet_v3_large,
}


def available_models() -> tuple[str, ...]:
    """Names accepted by build_model and model_config."""
    return tuple(MODEL_BUILDERS)


def default_options(name: str) -> dict[str, Any]:
    """The options of model ``name`` and their defaults, e.g. {"pretrained": "none"}."""
    if name not in MODEL_BUILDERS:
        raise ValueError(
            f"unknown model name {name!r}; available models: {', '.join(available_models())}"
        )
    parameters = inspect.signature(MODEL_BUILDERS[name]).parameters
    return {key: param.default for key, param in parameters.items() if key != "num_classes"}


def model_config(name: str, num_classes: int, **options: Any) -> dict[str, Any]:
    """A plain dict describing a model, all defaults filled in, for build_model(**config).

    Only str/int/float/bool values, so it fits in a checkpoint or a JSON file.
    """
    defaults = default_options(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"model {name!r} has no option {', '.join(unknown)}; "
            f"its options are: {', '.join(defaults) or 'none'}"
        )
    for key, value in options.items():
        expected = type(defaults[key])
        # A float option accepts an int; a bool is an int to Python but never one here.
        accepted = type(value) is expected or (expected is float and type(value) is int)
        if not accepted:
            raise TypeError(
                f"option {key!r} of model {name!r} must be a {expected.__name__}, got {value!r}"
            )
    return {"name": name, "num_classes": num_classes, **defaults, **options}


def build_model(name: str, num_classes: int, **options: Any) -> nn.Module:
    """Build model ``name`` with ``num_classes`` output channels; options as in model_config.

    The model maps (B, C, H, W) float images to (B, num_classes, H, W) float logits.
    """
    config = model_config(name, num_classes, **options)
    del config["name"]
    return MODEL_BUILDERS[name](**config)


class Segmenter(nn.Module):
    """A trained model as `python main.py predict` uses it: pixels in, logits out.

    forward: images `(N, 3, H, W)` uint8 RGB, any N, H and W -> logits `(N, K, H, W)`
    float32 at the input's size, whose argmax over dim 1 is the class of each pixel. The
    images are scaled to about the training resolution (`img_size`**2 pixels) keeping their
    aspect ratio, with sides that are multiples of the model's `size_multiple` (at least two
    of them), normalized as in training and segmented; the logits are scaled back.

    This module is also what `python main.py export` writes, as one graph for any H and W:
    the sizes are computed with `torch.sym_*` functions, which torch.export keeps symbolic
    where Python's `round` would fix them at the sample's size, and sides the model divides
    evenly leave no size-dependent padding in the graph.
    """

    def __init__(self, model: nn.Module, img_size: int) -> None:
        super().__init__()
        self.model = model
        self.img_size = img_size
        self.multiple = model.size_multiple

    def network_size(self, height, width) -> tuple:
        """(height, width) at which the model sees a picture of `height` x `width` pixels."""
        cells_per_pixel = self.img_size / (height * width) ** 0.5 / self.multiple
        return (  # rounded to the nearest number of cells: int() of x + 0.5
            self.multiple * torch.sym_max(2, torch.sym_int(height * cells_per_pixel + 0.5)),
            self.multiple * torch.sym_max(2, torch.sym_int(width * cells_per_pixel + 0.5)),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        size = self.network_size(height, width)
        inputs = F.interpolate(data.normalize(images), size=size, mode="bilinear", antialias=True)
        logits = self.model(inputs)
        return F.interpolate(logits.float(), size=(height, width), mode="bilinear")


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of model."""
    return sum(param.numel() for param in model.parameters())


def summarize(model: nn.Module, images: torch.Tensor) -> str:
    """Parameters, output shape and forward GFLOP per image of model on images (B, C, H, W)."""
    with FlopCounterMode(display=False) as flop_counter:
        logits = model(images)
    lines = [f"parameters: {count_parameters(model):,}"]
    inner = model.net if isinstance(model, TorchvisionSegmentation) else model
    for child_name, child in inner.named_children():
        lines.append(f"  {child_name}: {count_parameters(child):,}")
    gflop_per_image = flop_counter.get_total_flops() / images.shape[0] / 1e9
    lines += [
        f"input shape: {tuple(images.shape)}",
        f"output shape: {tuple(logits.shape)}",
        f"forward GFLOP per image: {gflop_per_image:.4g}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: print the summary of one model."""
    parser = argparse.ArgumentParser(
        description="Print a model's parameters, output shape and forward GFLOP per image."
    )
    parser.add_argument("--model", default="unet", choices=available_models())
    parser.add_argument("--num-classes", type=int, default=data.NUM_CLASSES)
    # The limits of `main.py train` (seglab/cli.py): past them a model does not fit.
    image_side = cli.int_range(1, cli.MAX_IMG_SIZE)
    parser.add_argument("--img-size", type=image_side, default=256, help="side of a square image")
    blocks = cli.int_range(1, cli.MAX_UNET_BLOCKS)
    parser.add_argument("--num-blocks", type=blocks, help="UNet only (default 4)")
    channels = cli.int_range(1, cli.MAX_BASE_CHANNELS)
    parser.add_argument("--base-chan", type=channels, help="UNet only (default 64)")
    args = parser.parse_args(argv)
    unet_options = {"num_blocks": args.num_blocks, "base_chan": args.base_chan}
    options = {key: value for key, value in unet_options.items() if value is not None}
    # On the meta device, shapes and FLOPs come out without allocating or computing anything,
    # so even the full-size UNet on large images is summarized at once.
    try:
        config = model_config(args.model, args.num_classes, **options)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    return cli.run(print_summary, argparse.Namespace(config=config, img_size=args.img_size), ())


def print_summary(args: argparse.Namespace) -> int:
    """Print the summary of the model `args.config` on one `args.img_size` image."""
    # On the meta device, shapes and FLOPs come out without allocating or computing anything,
    # so even the full-size UNet on large images is summarized at once.
    with torch.device("meta"):
        model = build_model(**args.config).eval()
    images = torch.empty(1, args.config.get("cin", 3), args.img_size, args.img_size, device="meta")
    print(f"model: {args.config}")
    print(summarize(model, images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
