"""Models for the lossless suites, built once per session.

``quantized_cnn``: a small Conv-BN-ReLU -> LSTM -> Linear network with dynamic height and
width, exported by torch at opset 12, set to IR 6, run through onnxruntime's
quantization pre-processing and its dynamic quantizer (ConvInteger, MatMulInteger,
DynamicQuantizeLinear, com.microsoft DynamicQuantizeLSTM, and the many ``ai.onnx.*`` and
``com.microsoft.*`` opset imports the pre-processing adds), as a user's quantized file is.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx
import pytest


@pytest.fixture(scope="session")
def quantized_cnn(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x))).mean(dim=2).transpose(1, 2)
            return self.fc(self.lstm(y)[0])

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("quantized")
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.randn(1, 3, 8, 8),), str(folder / "f.onnx"),
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {2: "H", 3: "W"}}, opset_version=12, dynamo=False)
    model = onnx.load(str(folder / "f.onnx"))
    model.ir_version = 6
    onnx.save(model, str(folder / "f6.onnx"))
    quiet = logging.getLogger()
    level, quiet.level = quiet.level, logging.ERROR
    try:
        quant_pre_process(str(folder / "f6.onnx"), str(folder / "pre.onnx"))
        quantize_dynamic(str(folder / "pre.onnx"), str(folder / "q.onnx"),
                         weight_type=QuantType.QUInt8)
    finally:
        quiet.level = level
    return onnx.load(str(folder / "q.onnx"))
