"""Issue 9, deterministic output: the same input, options and seed give byte-identical
files, within a process and across processes with different hash seeds (set iteration
order must never reach the written model)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from graphopt.cli.commands import main
from graphopt.fuzz_models import tiny_cnn
from graphopt.fuzz_mutations import VALID

ARGS = ["--pass", "cleanup", "--pass", "fold-batchnorm", "--pass", "fold-pad"]


def _model():
    """A tiny CNN with work for every lossless pass: BN to fold, pads to fold, duplicated
    initializers, foldable constants, Identity/Dropout, an If branch, a local function."""
    rng = np.random.default_rng(3)
    model = tiny_cnn(rng)
    for key in ("batchnorm", "move_conv_pads", "pad_pool", "duplicate_initializer",
                "foldable", "identity", "if_branch", "local_function", "shape_read"):
        model = VALID[key](model, rng) or model
    return model


def test_same_input_same_bytes_in_process_and_across_hash_seeds(tmp_path):
    src = tmp_path / "in.onnx"
    src.write_bytes(_model().SerializeToString())
    outs = [tmp_path / f"out{i}.onnx" for i in range(3)]
    for out in outs[:2]:
        assert main(["optimize", str(src), "-o", str(out), *ARGS]) == 0
    env = dict(os.environ, PYTHONHASHSEED="12345")
    code = ("import sys; from graphopt.cli.commands import main; "
            "sys.exit(main(sys.argv[1:]))")
    subprocess.run([sys.executable, "-c", code, "optimize", str(src), "-o", str(outs[2]),
                    *ARGS], check=True, env=env, capture_output=True)
    data = [p.read_bytes() for p in outs]
    assert data[0] == data[1] == data[2]
    assert len(data[0]) != len(src.read_bytes())  # the passes did change the model
