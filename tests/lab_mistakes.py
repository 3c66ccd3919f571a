"""Typical wrong answers to the lab's questions, as data: the teacher's list of what the
self-checks of tests/test_lab.py must reject (tests/test_lab_mistakes.py shows that they do).

A mistake is an edit of the solution: inside the top-level function or class `where` of
`file`, the text `old` (found there exactly once) becomes `new`. `hint` is a piece of text
that the failing check's message must hold, the likely mistake it names; "" when a check
can only say what it expected. To add one, copy an entry and change the edit; the test
reports an `old` that no longer matches the solution.

Q3 and Q13 are commands to run, with no code of their own: their checks fail when an
earlier answer does, and say which.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mistake:
    """A wrong answer: `old` -> `new` inside `where` of `file` in the solution."""

    name: str
    file: str
    where: str
    old: str
    new: str
    hint: str = ""


def mistake(name: str, file: str, where: str, old: str, new: str, hint: str = "") -> Mistake:
    return Mistake(name, file, where, old, new, hint)


CLAMP = "label_index.clamp_(max=len(label_table) - 1)"
BRIGHTNESS = "pixels = images.float().mul_(brightness).clamp_(0, 255)"
CONTRAST = "pixels.sub_(mean_gray).mul_(contrast).add_(mean_gray).clamp_(0, 255)"
SATURATION = "pixels.sub_(gray).mul_(saturation).add_(gray).clamp_(0, 255)"
ENCODER_CONV = """nn.Conv2d(cin, cout, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(cout),"""

MISTAKES: dict[int, list[Mistake]] = {
    1: [
        mistake(
            "wrap-around instead of clamping",
            "data.py",
            "decode_semantic",
            CLAMP,
            "label_index.remainder_(len(label_table))",
            hint="wrap around",
        ),
        mistake(
            "index computed in uint8",
            "data.py",
            "decode_semantic",
            "channels = semantic_rgb.to(torch.int32)",
            "channels = semantic_rgb",
            hint="int32 or int64",
        ),
        mistake(
            "uint8 overflow, then an int64 index",
            "data.py",
            "decode_semantic",
            "label_index = channels[0].mul(65536).add_(channels[1], alpha=256).add_(channels[2])",
            "red, green, blue = semantic_rgb\n"
            "label_index = (red * 65536 + green * 256 + blue).long()",
            hint="overflowed",
        ),
        mistake(
            "index past the end of the table",
            "data.py",
            "decode_semantic",
            CLAMP,
            "pass",
            hint="clamp",
        ),
        mistake(
            "channels in the wrong order",
            "data.py",
            "decode_semantic",
            "channels[0].mul(65536).add_(channels[1], alpha=256).add_(channels[2])",
            "channels[2].mul(65536).add_(channels[1], alpha=256).add_(channels[0])",
            hint="R * 65536 + G * 256 + B",
        ),
    ],
    2: [
        mistake(
            "mask resized as an image (bilinear)",
            "data.py",
            "StanfordDataset",
            "tv_tensors.Mask(semantic)",
            "tv_tensors.Image(semantic)",
            hint="nearest neighbour",
        ),
        mistake(
            "transforms never applied",
            "data.py",
            "StanfordDataset",
            "image, semantic = self.transforms(image, tv_tensors.Mask(semantic))",
            "pass",
            hint="resize",
        ),
        mistake(
            "only the image transformed",
            "data.py",
            "StanfordDataset",
            "image, semantic = self.transforms(image, tv_tensors.Mask(semantic))",
            "image = self.transforms(image)",
            hint="tv_tensors.Mask",
        ),
    ],
    4: [
        mistake(
            "no horizontal flip",
            "data.py",
            "train_transforms",
            "T.RandomHorizontalFlip(),",
            "",
            hint="flipped",
        ),
        mistake(
            "always flipped",
            "data.py",
            "train_transforms",
            "T.RandomHorizontalFlip()",
            "T.RandomHorizontalFlip(p=1.0)",
            hint="flipped",
        ),
        mistake(
            "plain resize instead of a random crop",
            "data.py",
            "train_transforms",
            "T.RandomResizedCrop(img_size, scale=scale, antialias=True)",
            "T.Resize((img_size, img_size), antialias=True)",
            hint="random crops",
        ),
        mistake(
            "color jitter in the loader",
            "data.py",
            "train_transforms",
            "T.RandomHorizontalFlip(),",
            "T.RandomHorizontalFlip(),\nT.ColorJitter(0.4, 0.4)",
            hint="geometric steps only",
        ),
        mistake(
            "one factor for the whole batch",
            "data.py",
            "jitter_colors",
            "torch.rand(3, len(images), 1, 1, 1)",
            "torch.rand(3, 1, 1, 1, 1)",
            hint="one per image, not one per batch",
        ),
        mistake(
            "no clipping: uint8 wraps around",
            "data.py",
            "jitter_colors",
            "return pixels.round_().to(torch.uint8)",
            "return (images.float() * brightness).to(torch.uint8)",
            hint="clip",
        ),
        mistake(
            "upside-down flips too",
            "data.py",
            "train_transforms",
            "T.RandomHorizontalFlip(),",
            "T.RandomHorizontalFlip(),\nT.RandomVerticalFlip(),",
            hint="RandomVerticalFlip",
        ),
        mistake(
            "the scale argument ignored",
            "data.py",
            "train_transforms",
            "T.RandomResizedCrop(img_size, scale=scale, antialias=True)",
            "T.RandomResizedCrop(img_size, antialias=True)",
            hint="pass `scale` on",
        ),
        mistake(
            "contrast around the mean gray of the batch",
            "data.py",
            "jitter_colors",
            "mean_gray = grayscale(pixels).mean(dim=(1, 2, 3), keepdim=True)",
            "mean_gray = grayscale(pixels).mean()",
            hint="each image on its own",
        ),
        mistake("no contrast", "data.py", "jitter_colors", CONTRAST, "", hint="contrast"),
        mistake("no saturation", "data.py", "jitter_colors", SATURATION, "", hint="saturation"),
    ],
    5: [
        mistake(
            "no padding",
            "models.py",
            "UNetConvBlock",
            "nn.Conv2d(cin, cout, kernel_size=3, padding=1)",
            "nn.Conv2d(cin, cout, kernel_size=3)",
            hint="padding",
        ),
        mistake(
            "Conv - BatchNorm - ReLU",
            "models.py",
            "UNetConvBlock",
            ENCODER_CONV,
            "nn.Conv2d(cin, cout, kernel_size=3, padding=1),\nnn.BatchNorm2d(cout),\n"
            "nn.ReLU(inplace=True),",
            hint="order",
        ),
        mistake(
            "convolutions without bias",
            "models.py",
            "UNetConvBlock",
            "nn.Conv2d(cin, cout, kernel_size=3, padding=1)",
            "nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)",
            hint="bias=False",
        ),
        mistake(
            "features and pooled output swapped",
            "models.py",
            "UNetConvBlock",
            "return self.block3(features), features",
            "return features, self.block3(features)",
            hint="(pooled outputs, features)",
        ),
    ],
    6: [
        mistake(
            "last block keeps the channels",
            "models.py",
            "UNetEncoder",
            "self.cout = base_chan * 2**num_blocks",
            "self.cout = base_chan * 2 ** (num_blocks - 1)",
            hint="16",
        ),
        mistake(
            "last block Conv - BatchNorm - ReLU",
            "models.py",
            "UNetEncoder",
            "nn.ReLU(inplace=True),\n            nn.BatchNorm2d(self.cout),",
            "nn.BatchNorm2d(self.cout),\n            nn.ReLU(inplace=True),",
            hint="order",
        ),
        mistake(
            "last block without bias",
            "models.py",
            "UNetEncoder",
            "nn.Conv2d(channels[-1], self.cout, kernel_size=3, padding=1)",
            "nn.Conv2d(channels[-1], self.cout, kernel_size=3, padding=1, bias=False)",
            hint="bias=False",
        ),
    ],
    7: [
        mistake(
            "skip connection concatenated in the wrong order",
            "models.py",
            "UNetUpConvBlock",
            "torch.cat([upsampled, encoder_features], dim=1)",
            "torch.cat([encoder_features, upsampled], dim=1)",
            hint="order",
        ),
        mistake(
            "skip connection added instead of concatenated",
            "models.py",
            "UNetUpConvBlock",
            "torch.cat([upsampled, encoder_features], dim=1)",
            "upsampled + encoder_features",
            hint="channels",
        ),
        mistake(
            "skip connection left out",
            "models.py",
            "UNetUpConvBlock",
            "torch.cat([upsampled, encoder_features], dim=1)",
            "torch.cat([upsampled, upsampled], dim=1)",
            hint="encoder_features",
        ),
        mistake(
            "skip connection concatenated along the batch",
            "models.py",
            "UNetUpConvBlock",
            "torch.cat([upsampled, encoder_features], dim=1)",
            "torch.cat([upsampled, encoder_features], dim=0)",
            hint="dim=1",
        ),
        mistake(
            "skip connection concatenated along the height",
            "models.py",
            "UNetUpConvBlock",
            "torch.cat([upsampled, encoder_features], dim=1)",
            "torch.cat([upsampled, encoder_features], dim=2)",
            hint="dim=1",
        ),
        mistake(
            "no padding after the upsampling",
            "models.py",
            "UNetUpConvBlock",
            "nn.Conv2d(cin, cin // 2, kernel_size=3, padding=1)",
            "nn.Conv2d(cin, cin // 2, kernel_size=3)",
            hint="padding",
        ),
    ],
    8: [
        mistake(
            "features finest first",
            "models.py",
            "UNetDecoder",
            "zip(self.blocks, reversed(encoder_features), strict=True)",
            "zip(self.blocks, encoder_features, strict=True)",
            hint="coarsest",
        ),
        mistake(
            "3x3 convolution to the logits",
            "models.py",
            "UNetDecoder",
            "nn.Conv2d(channels[-1], num_classes, kernel_size=1)",
            "nn.Conv2d(channels[-1], num_classes, kernel_size=3, padding=1)",
            hint="1x1",
        ),
        mistake(
            "no first block",
            "models.py",
            "UNetDecoder",
            "x = self.first_block(encoder_outputs)",
            "x = encoder_outputs",
            hint="never applied",
        ),
    ],
    9: [
        mistake(
            "no padding (the TODO left)",
            "models.py",
            "UNet",
            'images = nn.functional.pad(images, (0, pad_right, 0, pad_bottom), mode="replicate")',
            "pass",
            hint="pad it",
        ),
        mistake(
            "padding at the top and on the left",
            "models.py",
            "UNet",
            "(0, pad_right, 0, pad_bottom)",
            "(pad_right, 0, pad_bottom, 0)",
            hint="shifted against the pixels",
        ),
        mistake(
            "padding to a multiple of 2",
            "models.py",
            "UNet",
            "multiple = 2**self.num_blocks",
            "multiple = 2",
            hint="pad it",
        ),
    ],
    10: [
        mistake(
            "rows and columns swapped",
            "metrics.py",
            "confusion_counts",
            "targets.reshape(-1).long() * num_classes + preds.reshape(-1).long()",
            "preds.reshape(-1).long() * num_classes + targets.reshape(-1).long()",
            hint="rows and columns swapped",
        ),
        mistake(
            "unknown class counted",
            "metrics.py",
            "confusion_counts",
            "matrix[ignore_index] = 0",
            "pass",
            hint="ignore_index",
        ),
        mistake(
            "ignored column emptied instead of the row",
            "metrics.py",
            "confusion_counts",
            "matrix[ignore_index] = 0",
            "matrix[:, ignore_index] = 0",
            hint="column",
        ),
        mistake(
            "bincount without minlength",
            "metrics.py",
            "confusion_counts",
            "counts = torch.bincount(pair_index, minlength=num_classes * num_classes)",
            "return torch.bincount(pair_index).view(num_classes, num_classes)",
            hint="minlength",
        ),
    ],
    11: [
        mistake(
            "absent class counted as 0 in the means",
            "metrics.py",
            "scores_from_confusion",
            "iou = true_positives / (true_positives + false_positives + false_negatives)",
            "iou = (true_positives / (true_positives + false_positives + false_negatives))"
            ".nan_to_num(0.0)",
            hint="counted as 0",
        ),
        mistake(
            "unknown class in the means",
            "metrics.py",
            "scores_from_confusion",
            "per_class[ignore_index] = math.nan",
            "pass",
            hint="ignored class",
        ),
        mistake(
            "plain mean instead of nanmean",
            "metrics.py",
            "scores_from_confusion",
            '"miou": iou.nanmean()',
            '"miou": iou.mean()',
            hint="nanmean",
        ),
        mistake(
            "IoU without the false negatives",
            "metrics.py",
            "scores_from_confusion",
            "iou = true_positives / (true_positives + false_positives + false_negatives)",
            "iou = true_positives / (true_positives + false_positives)",
        ),
    ],
    12: [
        mistake(
            "weights not normalized",
            "losses.py",
            "class_weights_from_frequencies",
            "return (weights / weights[weighted].mean()).float()",
            "return weights.float()",
            hint="mean of 1",
        ),
        mistake(
            "ignored class in the mean",
            "losses.py",
            "class_weights_from_frequencies",
            "return (weights / weights[weighted].mean()).float()",
            "return (weights / weights.mean()).float()",
            hint="mean of 1",
        ),
        mistake(
            "unseen class weighted 0",
            "losses.py",
            "class_weights_from_frequencies",
            "weights[weighted & ~observed] = weights[observed].max()",
            "pass",
            hint="largest weight",
        ),
        mistake(
            "unseen class weighted 1 / 0",
            "losses.py",
            "class_weights_from_frequencies",
            "weights[weighted & ~observed] = weights[observed].max()",
            "weights[weighted & ~observed] = 1 / shares[weighted & ~observed]",
            hint="share 0",
        ),
        mistake(
            "shares not renormalized without the ignored class",
            "losses.py",
            "class_weights_from_frequencies",
            "shares = shares / shares[weighted].sum()",
            "shares = shares / shares.sum()",
        ),
    ],
    14: [
        mistake(
            "no batch dimension",
            "main.py",
            "segment_with_onnxruntime",
            "image[None].numpy()",
            "image.numpy()",
            hint="batch dimension",
        ),
        mistake(
            "pixels sent as floats",
            "main.py",
            "segment_with_onnxruntime",
            "image[None].numpy()",
            "image[None].float().numpy()",
            hint="not floats",
        ),
        mistake(
            "argmax over the wrong axis",
            "main.py",
            "segment_with_onnxruntime",
            "logits[0].argmax(axis=0)",
            "logits[0].argmax(axis=-1)",
            hint="classes",
        ),
        mistake(
            "the logits returned, not the classes",
            "main.py",
            "segment_with_onnxruntime",
            "torch.from_numpy(logits[0].argmax(axis=0))",
            "torch.from_numpy(logits[0])",
            hint="classes",
        ),
    ],
}


# Right answers written another way than the solution: every check of their question must
# pass (tests/test_lab_mistakes.py), so that the checks never refuse a correct answer.
RIGHT_VARIANTS: dict[int, list[Mistake]] = {
    5: [
        mistake(
            "the max-pool created first",
            "models.py",
            "UNetConvBlock",
            "super().__init__()\n        self.block1 = nn.Sequential(",
            "super().__init__()\nself.block3 = nn.MaxPool2d(kernel_size=2)\n"
            "self.block1 = nn.Sequential(",
        ),
    ],
    9: [
        mistake(
            "zeros instead of the replicated border",
            "models.py",
            "UNet",
            'mode="replicate"',
            'mode="constant"',
        ),
    ],
}
