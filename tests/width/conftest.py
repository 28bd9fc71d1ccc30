"""Shared helpers for width-pruning tests: torch model factories and export, with the
masked-equivalence oracle (``graphopt.testing.masked_equivalence``) in the toolkit."""

from __future__ import annotations

import io

import onnx
import pytest

import graphopt
from graphopt.testing import copy_model, masked_equivalence


def export(module, args, *, dynamo: bool = False, opset: int | None = None,
           input_names=("x",), output_names=("y",), dynamic_batch: bool = False
           ) -> onnx.ModelProto:
    """A torch module exported to ONNX (eval mode) and read back through graphopt.load."""
    import torch

    module = module.eval()
    buffer = io.BytesIO()
    kwargs = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic_batch and not dynamo:
        kwargs["dynamic_axes"] = {n: {0: "batch"} for n in (*input_names, *output_names)}
    with torch.no_grad():
        if dynamo:
            prog = torch.onnx.export(module, args, dynamo=True, input_names=list(input_names),
                                     output_names=list(output_names), verbose=False, **kwargs)
            return graphopt.load(prog.model_proto)
        torch.onnx.export(module, args, buffer, dynamo=False, input_names=list(input_names),
                          output_names=list(output_names), **kwargs)
    return graphopt.load(onnx.load_from_string(buffer.getvalue()))


def randomize_norms(module) -> None:
    """Non-trivial BatchNorm statistics, so BN layers are not identities."""
    import torch

    gen = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)


def _factories():
    """The torch.nn models, built lazily (importing torch costs seconds)."""
    import types

    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, mid, cout, stride=1):
            super().__init__()
            self.c1 = nn.Conv2d(cin, mid, 1, bias=False)
            self.b1 = nn.BatchNorm2d(mid)
            self.c2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
            self.b2 = nn.BatchNorm2d(mid)
            self.c3 = nn.Conv2d(mid, cout, 1, bias=False)
            self.b3 = nn.BatchNorm2d(cout)
            self.proj = None
            if stride != 1 or cin != cout:
                self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = torch.relu(self.b2(self.c2(y)))
            y = self.b3(self.c3(y))
            return torch.relu(y + (self.proj(x) if self.proj is not None else x))

    class ResNet(nn.Module):
        """Stem, bottlenecks with projection shortcuts, global pool, linear head."""

        def __init__(self, widths=(8, 16), blocks=(2, 1), classes=5):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.MaxPool2d(3, 2, 1))
            layers, cin = [], 8
            for i, (w, n) in enumerate(zip(widths, blocks)):
                for j in range(n):
                    layers.append(Bottleneck(cin, w, w * 4, 2 if (i and not j) else 1))
                    cin = w * 4
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            y = self.layers(self.stem(x))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            self.use_res = stride == 1 and cin == cout
            self.body = nn.Sequential(
                nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden), nn.ReLU6(),
                nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return x + self.body(x) if self.use_res else self.body(x)

    class MobileNetV2(nn.Module):
        """Depthwise convs, inverted residuals, ReLU6 (Clip), a 1x1 head conv."""

        def __init__(self, classes=5):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                      nn.ReLU6())
            self.blocks = nn.Sequential(InvertedResidual(8, 8, 1, 1),
                                        InvertedResidual(8, 12, 2, 4),
                                        InvertedResidual(12, 12, 1, 4))
            self.head = nn.Sequential(nn.Conv2d(12, 32, 1, bias=False), nn.BatchNorm2d(32),
                                      nn.ReLU6())
            self.fc = nn.Linear(32, classes)

        def forward(self, x):
            y = self.head(self.blocks(self.stem(x)))
            return self.fc(y.mean((2, 3)))

    class DenseBlock(nn.Module):
        """Each layer's output is concatenated to its input (DenseNet)."""

        def __init__(self, cin=8, growth=4, layers=3, classes=5):
            super().__init__()
            self.stem = nn.Conv2d(3, cin, 3, 1, 1)
            self.layers = nn.ModuleList()
            c = cin
            for _ in range(layers):
                self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(),
                                                 nn.Conv2d(c, growth, 3, 1, 1)))
                c += growth
            self.transition = nn.Conv2d(c, 8, 1)
            self.fc = nn.Linear(8, classes)

        def forward(self, x):
            y = self.stem(x)
            for layer in self.layers:
                y = torch.cat([y, layer(y)], 1)
            y = torch.relu(self.transition(y))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    class SqueezeExcite(nn.Module):
        """x * sigmoid(fc2(relu(fc1(mean over H, W)))) with Linear layers and a reshape."""

        def __init__(self, c=16, r=2, classes=5):
            super().__init__()
            self.conv = nn.Conv2d(3, c, 3, 1, 1)
            self.fc1 = nn.Linear(c, c // r)
            self.fc2 = nn.Linear(c // r, c)
            self.out = nn.Conv2d(c, 8, 1)
            self.fc = nn.Linear(8, classes)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3))))))
            y = y * s[:, :, None, None]
            y = torch.relu(self.out(y))
            return self.fc(y.amax((2, 3)))

    class MLP(nn.Module):
        """Linear-ReLU-Linear-GELU-Linear classifier on feature vectors."""

        def __init__(self, features=12, hidden=(32, 24), classes=5):
            super().__init__()
            self.l1 = nn.Linear(features, hidden[0])
            self.l2 = nn.Linear(hidden[0], hidden[1])
            self.l3 = nn.Linear(hidden[1], classes)

        def forward(self, x):
            return self.l3(nn.functional.gelu(self.l2(torch.relu(self.l1(x)))))

    class FlattenHead(nn.Module):
        """conv features flattened C×H×W into a Linear head."""

        def __init__(self, classes=5):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, 2, 1)
            self.bn = nn.BatchNorm2d(6)
            self.fc = nn.Linear(6 * 4 * 4, classes)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))

    class FFN(nn.Module):
        """Transformer feed-forward on [batch, seq, hidden]: MatMul + bias + GELU/SiLU."""

        def __init__(self, hidden=16, inner=32, act="gelu"):
            super().__init__()
            self.up = nn.Linear(hidden, inner)
            self.down = nn.Linear(inner, hidden)
            self.norm = nn.LayerNorm(hidden)
            self.act = {"gelu": nn.GELU(), "tanh_gelu": nn.GELU(approximate="tanh"),
                        "silu": nn.SiLU()}[act]

        def forward(self, x):
            return self.norm(x + self.down(self.act(self.up(x))))

    return types.SimpleNamespace(
        ResNet=ResNet, MobileNetV2=MobileNetV2, DenseBlock=DenseBlock,
        SqueezeExcite=SqueezeExcite, MLP=MLP, FlattenHead=FlattenHead, FFN=FFN,
        Bottleneck=Bottleneck, torch=torch, nn=nn)


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Torch-built models get the same random weights on every run."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(0)


@pytest.fixture(scope="session")
def wt():
    """The width-test toolkit: oracle, export, torch model factories (lazy)."""
    import types

    class _Lazy(types.SimpleNamespace):
        _models = None

        @property
        def models(self):
            if _Lazy._models is None:
                _Lazy._models = _factories()
            _Lazy._models.torch.manual_seed(0)  # same weights whichever test comes first
            return _Lazy._models

    return _Lazy(masked_equivalence=masked_equivalence, export=export, copy_model=copy_model,
                 randomize_norms=randomize_norms)
