"""``quantize``: int8 or float16 through onnxruntime's own tools, the last pass of a recipe.

Nothing here re-implements quantization; the pass prepares the model, calls onnxruntime
and checks what came back:

1. ``mode=dynamic``: ``onnxruntime.quantization.quantize_dynamic`` (int8 weights,
   activations quantized at run time: ``DynamicQuantizeLinear`` + ``MatMulInteger``/
   ``ConvInteger``), for CPU. Per-channel weight scales by default (onnxruntime's own default
   is per-tensor; per-channel measured as fast and far closer on all-MiniLM-L6-v2).
2. ``mode=static``: ``quantize_static`` in the QDQ format (``QuantizeLinear``/
   ``DequantizeLinear`` pairs around int8 weights and activations, per-channel weights by
   default), the format TensorRT and ORT's execution providers consume. Activation ranges
   come from the calibration feeds, read through a ``CalibrationDataReader``; without
   calibration data they come from generated inputs and the report says so (a skip entry).
3. ``mode=fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16`` with the
   graph's inputs and outputs kept float32 (``keep_io_types``), ops onnxruntime lists as
   needing float32 (its ``DEFAULT_OP_BLOCK_LIST``) plus ``block_ops`` kept in float32.
4. Pre-processing inside the pass: int8 modes convert a model below opset 13 to opset 13
   (onnx's version converter; per-channel QDQ needs the ``axis`` of opset 13), then shape inference (graphopt's, which runs onnxruntime's
   symbolic inference without importing torch) and then onnxruntime's ``quant_pre_process``
   (its basic graph optimization and onnx shape inference) for the int8 modes, unless
   ``preprocess=false``.
5. A model that is already quantized (QDQ pairs, integer MatMul/Conv, QLinear ops,
   float16 weights) is refused with one error naming what was found: quantize the float
   model it came from.
6. ``exclude`` (node-name globs) keeps matching nodes in float; ``keep_float=N`` (or a
   fraction) in dynamic mode keeps the N MatMul/Gemm/Conv nodes in float whose outputs
   suffer most when each alone is quantized (measured on the calibration feeds through
   quantize_dynamic's ``nodes_to_exclude``), each listed as a skip with its damage.
   Per-channel scales (the default) are what matters most on all-MiniLM-L6-v2 (embedding cosine 0.964
   per-tensor, 0.993 per-channel; benchmarks/FRONTIER.md). ``graphopt.*`` metadata
   (head counts, kept layers) is carried over. The pass measures its own fidelity on one
   sample feed (cosine and max abs difference per output against its input) and reports
   it in its counters as parts per million (``cosine_ppm_<output>``), since the manager
   checks lossy passes only for structure (checker, ORT load).
"""

from __future__ import annotations

import fnmatch
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx.version_converter

from graphopt.errors import ConfigError, UnsupportedModelError
from graphopt.analysis.precision import LOW_PRECISION, QUANTIZED_OPS, quantized_ops
from graphopt.core.contract import Context, Pass, PassResult, Skip, SkipCode
from graphopt.core.needs import Need, check_needs
from graphopt.core.registry import register

from . import _quantize_static as static

_STATIC_OPS = ("Conv", "MatMul", "Gemm")
# Above this many bytes of weights, onnxruntime's quantizers write external data.
_EXTERNAL_BYTES = 1536 * 2**20


@dataclass(frozen=True)
class QuantizeConfig:
    """``mode``: dynamic (int8 weights, CPU), static (int8 QDQ, calibrated), fp16.

    ``per_channel``: per-channel weight scales (default on in both int8 modes; on
    all-MiniLM-L6-v2 dynamic int8 keeps embedding cosine 0.993 per-channel against 0.964
    per-tensor at the same speed, benchmarks/FRONTIER.md; ``per_channel=false`` gives
    onnxruntime's per-tensor default). ``op_types``: ops to quantize (default: onnxruntime's
    list for dynamic; Conv, MatMul and Gemm for static, whose MatMuls are quantized only
    with a constant weight: quantizing every activation of a transformer, Softmax and
    LayerNorm inputs included, takes all-MiniLM-L6-v2 to cosine 0.53, weights-only 0.89). ``exclude``: node-name globs kept in float. ``calibrate``: how
    static mode turns activations into ranges (minmax, entropy, percentile).
    ``block_ops``: fp16, more op types kept in float32. ``preprocess``: run shape inference
    and onnxruntime's ``quant_pre_process`` first (int8 modes). ``keep_float`` (int8 modes):
    N >= 1 nodes, or a fraction in (0, 1) of the MatMul/Gemm/Conv nodes with a constant
    weight, kept in float: the ones whose output damage is largest when each is quantized
    alone (``_sensitivity``, on up to ``sensitivity_feeds`` calibration feeds; static mode
    reuses one calibration for every trial). Static only (``passes/_quantize_static.py``):
    ``activations``/``weights`` int8 or uint8, ``act_symmetric``/``weight_symmetric``,
    ``moving_average`` (calibration ranges as moving averages over the feeds),
    ``percentile`` (with calibrate=percentile), ``format`` qdq or qoperator.
    """

    mode: Literal["dynamic", "static", "fp16"] = "dynamic"
    per_channel: bool | None = None
    reduce_range: bool = False
    op_types: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    calibrate: Literal["minmax", "entropy", "percentile"] = "minmax"
    block_ops: tuple[str, ...] = ()
    preprocess: bool = True
    keep_float: float = 0.0
    sensitivity_feeds: int = 4
    activations: Literal["int8", "uint8"] = "int8"
    weights: Literal["int8", "uint8"] = "int8"
    act_symmetric: bool = False
    weight_symmetric: bool = True
    moving_average: bool = False
    percentile: float = 99.999
    format: Literal["qdq", "qoperator"] = "qdq"

    def __post_init__(self) -> None:
        if self.keep_float < 0 or (self.keep_float and self.mode == "fp16"):
            raise ConfigError("keep_float is a count (>= 1) or a fraction (0-1) of nodes, "
                              "for the int8 modes")
        static_only = {"activations": "int8", "weights": "int8", "act_symmetric": False,
                       "weight_symmetric": True, "moving_average": False,
                       "percentile": 99.999, "format": "qdq"}
        changed = [k for k, v in static_only.items() if getattr(self, k) != v]
        if changed and self.mode != "static":
            raise ConfigError(f"{changed[0]} applies to mode=static only")
        if not 0 < self.percentile <= 100:
            raise ConfigError("percentile is in (0, 100]")
        if self.mode == "fp16" and (self.per_channel or self.reduce_range):
            raise ConfigError("per_channel and reduce_range apply to the int8 modes, not fp16")


@register
class Quantize(Pass[QuantizeConfig], name="quantize", lossless=False):
    """Quantize with onnxruntime's tools: dynamic int8, static int8 QDQ (calibrated,
    per-channel) or fp16; runs last in a recipe. See the module docstring."""

    requires = (Need.FLOAT_MODEL,)

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        cfg = self.config
        check_needs(self, model, ctx)  # a quantize before this one in the same recipe
        skipped: list[Skip] = []
        inputs = [i.name for i in model.graph.input]
        with tempfile.TemporaryDirectory(prefix="graphopt-quantize-") as tmp:
            folder = Path(tmp)
            if cfg.mode == "fp16":
                out = self._fp16(model)
            else:
                work = _constants_as_initializers(_opset_13(model, skipped), skipped)
                src = self._prepared(work, folder, ctx, skipped)
                out = self._int8(src, folder, ctx, skipped)
        _carry_metadata(model, out)
        counters = _count(model, out)
        if counters["quantized_nodes"] == 0:
            skipped.append(Skip("model", f"onnxruntime found nothing to quantize in {cfg.mode} "
                                "mode (no supported op with float weights)"))
            return PassResult(model, False, counters, skipped)
        counters.update(self._fidelity(model, out, ctx, skipped))
        if cfg.keep_float:
            counters["kept_float_nodes"] = sum(s.reason.startswith("kept float") for s in skipped)
        return PassResult(out, True, counters, skipped)

    # ------------------------------------------------------------------ steps

    def _prepared(self, model: onnx.ModelProto, folder: Path, ctx: Context,
                  skipped: list[Skip]) -> onnx.ModelProto | Path:
        """Shape inference and onnxruntime's quant_pre_process (module doc, 4)."""
        if not self.config.preprocess:
            return model
        from onnxruntime.quantization import quant_pre_process

        from graphopt.analysis.shapes import infer_shapes

        work = onnx.ModelProto()
        work.CopyFrom(model)
        infer_shapes(work)  # symbolic inference here: quant_pre_process's would import torch
        from graphopt.ir.model import save

        path = folder / "pre.onnx"
        # From a file: given a ModelProto, quant_pre_process moves its weights out of the
        # proto (external initializers), and when ORT's optimizer then fails its fallback
        # writes a model pointing at a "foo.bin" that does not exist.
        source = save(work, folder / "in.onnx")
        try:
            quant_pre_process(str(source), path, skip_symbolic_shape=True,
                              save_as_external_data=_large(model))
        except Exception as exc:  # noqa: BLE001 - ORT's optimizer and inference fail variously
            skipped.append(Skip("preprocess", f"onnxruntime's quant_pre_process failed "
                                f"({_first_line(exc)}); quantized without it"))
            return work
        return path

    def _int8(self, src: onnx.ModelProto | Path, folder: Path, ctx: Context,
              skipped: list[Skip]) -> onnx.ModelProto:
        from onnxruntime import quantization as q

        from graphopt.ir.model import load

        cfg = self.config
        model = src if isinstance(src, onnx.ModelProto) else onnx.load(str(src),
                                                                       load_external_data=False)
        excluded = [n.name for n in model.graph.node
                    if n.name and any(fnmatch.fnmatchcase(n.name, p) for p in cfg.exclude)]
        op_types = list(cfg.op_types) if cfg.op_types else None
        if cfg.mode == "static" and cfg.op_types is None:
            op_types = list(_STATIC_OPS)
        common = dict(
            op_types_to_quantize=op_types,
            reduce_range=cfg.reduce_range,
            use_external_data_format=_large(model) if isinstance(src, onnx.ModelProto)
            else any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer),
        )
        if cfg.keep_float:
            excluded += self._least_robust(src, model, folder, ctx, excluded, skipped, common)
        common["nodes_to_exclude"] = excluded or None
        out = folder / "quantized.onnx"
        source = str(src) if isinstance(src, Path) else src
        try:
            if cfg.mode == "dynamic":
                q.quantize_dynamic(source, out, per_channel=cfg.per_channel is not False,
                                   weight_type=q.QuantType.QInt8, **common)
            else:
                if not ctx.calibration:
                    skipped.append(Skip("calibration", "no calibration data given: activation "
                                        "ranges come from generated inputs, which only test "
                                        "structure; give --calibration for real ranges"))
                static.quantize_static(source, out, cfg, *self._static_data(src, model, ctx),
                                       folder / "ranges.json", common)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer raises anything
            raise UnsupportedModelError(
                f"onnxruntime's {cfg.mode} quantizer failed: {_first_line(exc)} (exclude the "
                "offending nodes with exclude=NAME_GLOB, or set preprocess=false)") from exc
        return load(out)

    def _static_data(self, src, model: onnx.ModelProto, ctx: Context):
        """(calibration feeds, the model's input names) for static mode."""
        feeds = ctx.calibration_feeds(model if isinstance(src, onnx.ModelProto)
                                      else onnx.load(str(src), load_external_data=False))
        return feeds, [i.name for i in model.graph.input]

    def _least_robust(self, src, model: onnx.ModelProto, folder: Path, ctx: Context,
                      excluded: list[str], skipped: list[Skip], common: dict) -> list[str]:
        """The ``keep_float`` nodes most damaged by quantization, each listed in a skip
        with its measured damage (``_sensitivity``)."""
        cfg = self.config
        init = {t.name for t in model.graph.initializer}
        cands = [n.name for n in model.graph.node if n.name and n.name not in excluded
                 and n.op_type in _STATIC_OPS and any(i in init for i in n.input[1:2])]
        if not cands:
            return []
        count = int(cfg.keep_float) if cfg.keep_float >= 1 else \
            max(1, int(np.ceil(cfg.keep_float * len(cands))))
        feeds = ctx.calibration_feeds(model)[:max(1, cfg.sensitivity_feeds)]
        if cfg.mode == "static":
            quantize_one = static.one_node_quantizer(src, cfg, *self._static_data(src, model, ctx),
                                                     folder / "ranges.json", common)
        else:
            quantize_one = _dynamic_one(src, model, per_channel=cfg.per_channel is not False,
                                        reduce_range=cfg.reduce_range)
        damage = _sensitivity(src, model, cands, excluded, feeds, folder, quantize_one)
        ranked = sorted(cands, key=lambda n: -damage[n])[:count]
        source = "calibration" if ctx.calibration else "generated"
        for rank, name in enumerate(ranked, 1):
            skipped.append(Skip(name, f"kept float (keep_float): damage {damage[name]:.2e} "
                                f"(1 - output cosine, quantized alone, on {len(feeds)} "
                                f"{source} feeds), {rank} of {len(cands)}",
                                SkipCode.EXCLUDED))
        return ranked

    def _fp16(self, model: onnx.ModelProto) -> onnx.ModelProto:
        from onnxruntime.transformers import float16

        cfg = self.config
        work = onnx.ModelProto()
        work.CopyFrom(model)
        blocked = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(cfg.block_ops))
        nodes = [n.name for n in work.graph.node
                 if n.name and any(fnmatch.fnmatchcase(n.name, p) for p in cfg.exclude)]
        try:
            return float16.convert_float_to_float16(
                work, keep_io_types=True, op_block_list=blocked, node_block_list=nodes or None,
                disable_shape_infer=_large(model))
        except Exception as exc:  # noqa: BLE001
            raise UnsupportedModelError(f"onnxruntime's float16 converter failed: "
                                        f"{_first_line(exc)}") from exc

    def _fidelity(self, before: onnx.ModelProto, after: onnx.ModelProto, ctx: Context,
                  skipped: list[Skip]) -> dict[str, int]:
        """Cosine of each float output against the input model on one sample feed."""
        from graphopt.runtime.session import ort_session, run_model

        try:
            feed = ctx.sample_feeds(before, 1)[0]
            ref = run_model(ort_session(before, lean=True), feed)
            got = run_model(ort_session(after, lean=True), feed)
        except Exception as exc:  # noqa: BLE001 - the manager's ORT load reports real failures
            skipped.append(Skip("fidelity", f"not measured: {_first_line(exc)}"))
            return {}
        counters = {}
        for name, r in ref.items():
            g = got.get(name)
            if g is None or r.dtype.kind != "f" or r.shape != g.shape:
                continue
            counters[f"cosine_ppm_{name}"] = int(round(1e6 * _cosine(r, g)))
        return counters


def _dynamic_one(src, model: onnx.ModelProto, **options):
    """``quantize(node, others, out)``: ``src`` through quantize_dynamic with only ``node``
    quantized (``others`` in ``nodes_to_exclude``)."""
    from onnxruntime import quantization as q

    ops = {n.name: n.op_type for n in model.graph.node}
    source = str(src) if isinstance(src, Path) else src
    large = _large(model)

    def quantize(node: str, others: list[str], out: Path) -> None:
        q.quantize_dynamic(source, out, per_channel=options["per_channel"],
                           reduce_range=options["reduce_range"], weight_type=q.QuantType.QInt8,
                           op_types_to_quantize=[ops[node]], nodes_to_exclude=others,
                           use_external_data_format=large)
    return quantize


def _sensitivity(src, model: onnx.ModelProto, cands: list[str], excluded: list[str],
                 feeds, folder: Path, quantize_one) -> dict[str, float]:
    """Per node of ``cands``: 1 - the mean cosine of the outputs against float when only
    that node is quantized (``quantize_one(node, others, out)`` writes that model: every
    other candidate and ``excluded`` in ``nodes_to_exclude``)."""
    from graphopt.ir.model import load
    from graphopt.runtime.session import ort_session, run_model

    names = {i.name for i in model.graph.input}
    feeds = [{k: v for k, v in f.items() if k in names} for f in feeds]
    float_model = model if isinstance(src, onnx.ModelProto) else load(src)
    sess = ort_session(float_model, lean=True)
    ref = [run_model(sess, f) for f in feeds]
    out = folder / "one.onnx"
    damage = {}
    for name in cands:
        quantize_one(name, [c for c in cands if c != name] + excluded, out)
        sess = ort_session(load(out), lean=True)
        cos = [_cosine(r[k], g[k]) for r, f in zip(ref, feeds)
               for g in [run_model(sess, f)] for k in r if r[k].dtype.kind == "f"]
        damage[name] = 1.0 - float(np.mean(cos)) if cos else 0.0
    return damage


def _constants_as_initializers(model: onnx.ModelProto, skipped: list[Skip]
                               ) -> onnx.ModelProto:
    """A copy whose ``Constant`` tensor nodes of the main graph holding more than 16
    values (weights, not shapes or scales) are initializers:
    onnxruntime's quantizers only quantize weights that are initializers, and refuse a
    Conv whose weight a Constant node produces (Paddle exports, PP-OCRv4)."""
    constants = [n for n in model.graph.node if n.op_type == "Constant" and len(n.attribute) == 1
                 and n.attribute[0].name == "value" and n.output
                 and int(np.prod(n.attribute[0].t.dims, dtype=np.int64)) > 16]
    if not constants:
        return model
    work = onnx.ModelProto()
    work.CopyFrom(model)
    moved = {n.output[0] for n in constants}
    keep = [n for n in work.graph.node if not (n.op_type == "Constant" and n.output
                                                and n.output[0] in moved)]
    for node in work.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in moved:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            work.graph.initializer.append(tensor)
    del work.graph.node[:]
    work.graph.node.extend(keep)
    skipped.append(Skip("constants", f"{len(moved)} Constant nodes made initializers, so "
                        "onnxruntime's quantizer sees their weights"))
    return work


def _opset_13(model: onnx.ModelProto, skipped: list[Skip]) -> onnx.ModelProto:
    """``model`` converted to opset 13 when it is older: per-channel QDQ needs the ``axis``
    of QuantizeLinear/DequantizeLinear (opset 13), and onnxruntime's quantizer writes it
    into an opset-12 graph that the checker then refuses (PP-OCRv4's detector)."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if version >= 13:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, 13)
    except Exception as exc:  # noqa: BLE001 - the converter lacks adapters for some ops
        raise UnsupportedModelError(
            f"int8 quantization needs opset 13 and onnx cannot convert this opset-{version} "
            f"model: {_first_line(exc)} (re-export it with opset 13 or later)") from exc
    skipped.append(Skip("opset", f"converted from opset {version} to 13 for per-channel "
                        "quantization (QuantizeLinear/DequantizeLinear axis)"))
    return converted


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b / (na * nb)) if na and nb else 0.0


def _count(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, int]:
    """Quantization ops and low-precision weights in the result; ``quantized_nodes`` is
    0 when onnxruntime changed nothing that quantization changes."""
    ops: dict[str, int] = {}
    for n in after.graph.node:
        if n.op_type in QUANTIZED_OPS:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    low = sum(1 for t in after.graph.initializer if t.data_type in LOW_PRECISION)
    counters = {f"{op}_nodes": c for op, c in sorted(ops.items())}
    counters["low_precision_weights"] = low
    counters["quantized_nodes"] = sum(ops.values()) or low
    return counters


def _carry_metadata(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    have = {p.key for p in dst.metadata_props}
    for prop in src.metadata_props:
        if prop.key not in have:
            dst.metadata_props.add(key=prop.key, value=prop.value)


def _large(model: onnx.ModelProto) -> bool:
    from graphopt.ir.model import initializer_bytes

    return initializer_bytes(model) >= _EXTERNAL_BYTES


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
