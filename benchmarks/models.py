"""Models the benchmark scripts build (plain ``torch.nn``: torchvision cannot be used here)."""

from __future__ import annotations

import os
import tempfile


def emit(rows: list[dict], args, render) -> None:
    """Print the rows as JSON (``--json``) or through the script's table renderer."""
    import json

    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        render(rows)


def timing_args(parser, cache_name: str, threads: int = 1) -> None:
    """The A/B timing options the benchmark scripts share (and --cache, --json)."""
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"ORT intra-op threads (default {threads}; 0: ORT's default)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), cache_name))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def resnet50(*, trained_bn_stats: bool = False):
    """ResNet-50: bottlenecks [3, 4, 6, 3], widths 64-2048, projection shortcuts, BatchNorm,
    random weights, eval mode. ``trained_bn_stats`` gives the BatchNorms running statistics
    like a trained network's (seeded), so folding them is not a no-op."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int):
            super().__init__()
            cout = 4 * width
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
            )
            self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.body(x) + self.skip(x))

    layers: list = [nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                    nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    torch.manual_seed(0)
    model = nn.Sequential(*layers)
    if trained_bn_stats:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=generator))
                    m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=generator))
    return model.eval()
