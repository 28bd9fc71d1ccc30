"""Build the sample CNN in plain torch.nn and export it to ONNX with graphopt.exporters.

    python samples/cnn/build.py build/sample-cnn        # writes build/sample-cnn/cnn.onnx

The network is small but has what graphopt's lossless passes look for: Conv-BatchNorm-ReLU
blocks (BatchNorm with non-trivial statistics, as after training), an explicit zero-padding
layer in front of a strided Conv, Dropout, a residual add, global average pooling and a
linear head. It is exported with ``optimize=False`` so the ONNX file keeps BatchNorm, Pad
and Dropout as the network has them: the exporter's own folding would leave the passes
nothing to do. Weights come from a fixed seed, so every build gives the same file.

The TorchScript exporter is the default here: it takes well under a second where the dynamo
exporter takes several, and its unoptimized graph is what the lossless passes fully clean
up. (dynamo's unoptimized graph also computes each Conv's zero bias from ``Shape`` and
``CastLike`` nodes, which ``cleanup`` does not fold yet, so ``fold-batchnorm`` then skips
those Convs with the reason in the report.) ``--exporter auto`` tries dynamo first.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from graphopt.exporters import export
from torch import nn

SEED = 0
IMAGE = (3, 32, 32)
CLASSES = 10


def conv_bn_relu(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class Residual(nn.Module):
    """relu(x + bn(conv(conv_bn_relu(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class SampleCNN(nn.Module):
    def __init__(self, width: int = 16, classes: int = CLASSES):
        super().__init__()
        self.stem = conv_bn_relu(IMAGE[0], width)
        # Padding as its own layer (as ported TF/Keras models often have): fold-pad's case.
        self.down = nn.Sequential(nn.ZeroPad2d(1), conv_bn_relu(width, 2 * width, stride=2,
                                                                padding=0))
        self.res = Residual(2 * width)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                                  nn.Linear(2 * width, classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.res(self.down(self.stem(image))))


def build_model(seed: int = SEED) -> SampleCNN:
    """The sample network with seeded weights and BatchNorm statistics like a trained one."""
    torch.manual_seed(seed)
    model = SampleCNN()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(1 + 0.2 * torch.randn(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="build/sample-cnn", type=Path)
    parser.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"],
                        default="torchscript")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    model = build_model()
    example = torch.randn(2, *IMAGE, generator=torch.Generator().manual_seed(SEED))
    path = export(model, example, args.out_dir / "cnn.onnx", input_names=["image"],
                  output_names=["logits"],
                  dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                  exporter=args.exporter, optimize=False)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
