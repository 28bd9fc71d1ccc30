"""graphopt.exporters: torch modules and transformers models to ONNX, checked through ORT."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import onnx
import pytest

import graphopt
import graphopt.ir.model
from graphopt.errors import ExportError, GraphoptError
from graphopt.testing import run

torch = pytest.importorskip("torch")
from graphopt.exporters import export, export_hf  # noqa: E402

EXPORTERS = ["dynamo", "torchscript"]


def _cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.ZeroPad2d(1), torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Dropout(0.2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )


def _mlp() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


class _DataDependent(torch.nn.Module):
    """A branch on a tensor's value: torch.export refuses it, tracing records one side."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class _ExportsDifferently(torch.nn.Module):
    """Computes something else while being exported: the check must catch it."""

    def forward(self, x):
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            return x * 3
        return x * 2


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _check_runs(path, module, shapes):
    model = graphopt.load(path)
    name = model.graph.input[0].name
    for shape in shapes:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = module.eval()(x).numpy()
        got = run(model, {name: x.numpy()})
        np.testing.assert_allclose(next(iter(got.values())), expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_cnn_batch_axis_stays_dynamic(tmp_path, exporter):
    """A small CNN (pad, conv, BN, dropout, pool, linear): batch axis symbolic, runs at 1 and 3."""
    module = _cnn()
    path = export(module, torch.randn(2, 3, 16, 16), tmp_path / "cnn.onnx",
                  input_names=["image"], output_names=["logits"],
                  dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, exporter=exporter)
    model = onnx.load(path)
    assert _dims(model.graph.input[0]) == ["batch", 3, 16, 16]
    assert _dims(model.graph.output[0]) == ["batch", 5]
    assert model.ir_version <= graphopt.ir.model.max_ir_version()
    assert module.training, "the module's training flag is restored"
    _check_runs(path, module, [(1, 3, 16, 16), (3, 3, 16, 16)])


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_mlp_with_axis_list(tmp_path, exporter):
    """An MLP with default input names and dynamic_axes given as a list of axes."""
    module = _mlp()
    path = export(module, (torch.randn(2, 12),), tmp_path / "mlp.onnx",
                  dynamic_axes={"input": [0]}, exporter=exporter)
    model = onnx.load(path)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert _dims(model.graph.input[0]) == ["input_dim_0", 12]
    _check_runs(path, module, [(1, 12), (5, 12)])


def test_auto_falls_back_to_torchscript(tmp_path, caplog):
    """exporter='auto': dynamo refuses a data-dependent branch, TorchScript exports it."""
    with caplog.at_level(logging.WARNING, logger="graphopt.exporters.torch_export"):
        path = export(_DataDependent(), torch.ones(2, 3), tmp_path / "dd.onnx")
    assert path.is_file()
    assert "falling back to the TorchScript exporter" in caplog.text
    assert "dynamo exporter failed" in caplog.text


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_mismatch_raises_and_writes_nothing(tmp_path, exporter):
    """An export that disagrees with torch raises ExportError naming the output; no file."""
    target = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="output 'output' differs by up to") as info:
        export(_ExportsDifferently(), torch.ones(2, 3), target, exporter=exporter)
    assert isinstance(info.value, GraphoptError)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_mismatch_in_both_exporters_names_both(tmp_path):
    """exporter='auto' mismatching twice reports the dynamo and the TorchScript result."""
    with pytest.raises(ExportError) as info:
        export(_ExportsDifferently(), torch.ones(2, 3), tmp_path / "bad.onnx")
    text = str(info.value)
    assert "dynamo export disagrees" in text and "torchscript export disagrees" in text


def test_check_false_keeps_mismatching_export(tmp_path):
    """check=False skips the ORT comparison and writes the model."""
    path = export(_ExportsDifferently(), torch.ones(2, 3), tmp_path / "kept.onnx",
                  check=False, exporter="torchscript")
    assert path.is_file()


def test_check_with_monkeypatched_runtime(tmp_path, monkeypatch):
    """A perturbed ORT output (monkeypatched) is reported with the tolerance used."""
    from graphopt.exporters import torch_export

    real = torch_export._ort_outputs
    monkeypatch.setattr(torch_export, "_ort_outputs",
                        lambda model, feeds: [o + 0.01 for o in real(model, feeds)])
    with pytest.raises(ExportError, match=r"atol=0.001, rtol=0"):
        export(_mlp(), torch.randn(2, 12), tmp_path / "m.onnx", exporter="torchscript",
               atol=1e-3, rtol=0)


def test_optimize_false_keeps_batchnorm(tmp_path):
    """optimize=False keeps BatchNormalization and Pad for graphopt's own passes."""
    path = export(_cnn(), torch.randn(2, 3, 16, 16), tmp_path / "raw.onnx",
                  exporter="torchscript", optimize=False)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"BatchNormalization", "Pad", "Conv"} <= ops


def test_bad_arguments(tmp_path):
    """Unknown exporter, unknown dynamic-axes name and a non-module are ExportErrors."""
    with pytest.raises(ExportError, match="unknown exporter"):
        export(_mlp(), torch.randn(2, 12), tmp_path / "a.onnx", exporter="jit")
    with pytest.raises(ExportError, match="dynamic_axes names 'x'"):
        export(_mlp(), torch.randn(2, 12), tmp_path / "a.onnx", dynamic_axes={"x": [0]})
    with pytest.raises(ExportError, match="expected a torch.nn.Module"):
        export(lambda x: x, torch.randn(2, 12), tmp_path / "a.onnx")


def test_torch_missing_is_a_clear_error(tmp_path, monkeypatch):
    """Without torch, export raises ExportError telling to install graphopt[torch]."""
    from graphopt.exporters import torch_export

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ExportError, match=r"graphopt\[torch\]"):
        torch_export.export(object(), None, tmp_path / "x.onnx")


def test_import_does_not_import_torch():
    """Importing graphopt.exporters (and the module) leaves torch unimported."""
    code = ("import sys, graphopt.exporters, graphopt.exporters.torch_export; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def bert_config():
    transformers = pytest.importorskip("transformers")
    return transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, vocab_size=100,
                                   max_position_embeddings=64)


def _bert_feeds(batch, seq, pad=0):
    rng = np.random.default_rng(batch * 100 + seq)
    mask = np.ones((batch, seq), np.int64)
    if pad:
        mask[0, -pad:] = 0
    return {"input_ids": rng.integers(0, 100, (batch, seq), dtype=np.int64),
            "attention_mask": mask, "token_type_ids": np.zeros((batch, seq), np.int64)}


def _assert_matches_torch(path, hf_model, shapes):
    model = graphopt.load(path)
    for batch, seq, pad in shapes:
        feeds = _bert_feeds(batch, seq, pad)
        with torch.no_grad():
            ref = hf_model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        got = run(model, feeds)
        np.testing.assert_allclose(got["last_hidden_state"], ref.last_hidden_state.numpy(),
                                   atol=1e-4, rtol=1e-3)
        np.testing.assert_allclose(got["pooler_output"], ref.pooler_output.numpy(),
                                   atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_hf_bert_from_config(tmp_path, bert_config, exporter):
    """A tiny BERT from a config: named dynamic inputs/outputs; padded masks run right."""
    path = export_hf(bert_config, tmp_path / "bert.onnx", exporter=exporter)
    model = onnx.load(path)
    assert {i.name: _dims(i) for i in model.graph.input} == {
        n: ["batch", "sequence"] for n in ("input_ids", "attention_mask", "token_type_ids")}
    assert {o.name: _dims(o) for o in model.graph.output} == {
        "last_hidden_state": ["batch", "sequence", 32], "pooler_output": ["batch", 32]}
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)  # export_hf's default seed: the same random weights
    reference = transformers.AutoModel.from_config(bert_config).eval()
    _assert_matches_torch(path, reference, [(1, 5, 0), (3, 11, 4)])


def test_hf_local_folder_and_config_file(tmp_path, bert_config):
    """A saved folder loads its weights; its config.json alone gives random weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    hf_model = transformers.BertModel(bert_config).eval()
    folder = tmp_path / "bert"
    hf_model.save_pretrained(folder)
    path = export_hf(folder, tmp_path / "folder.onnx", exporter="torchscript", seq_len=8)
    _assert_matches_torch(path, hf_model, [(2, 7, 2)])
    path = export_hf(folder / "config.json", tmp_path / "config.onnx", exporter="torchscript",
                     task="text-classification")
    assert [o.name for o in onnx.load(path).graph.output] == ["logits"]


def test_hf_never_downloads(tmp_path):
    """A hub name that is not a local path is refused instead of downloaded."""
    pytest.importorskip("transformers")
    with pytest.raises(ExportError, match="never downloads"):
        export_hf("bert-base-uncased", tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="unknown task"):
        export_hf({"model_type": "bert"}, tmp_path / "x.onnx", task="translation")
