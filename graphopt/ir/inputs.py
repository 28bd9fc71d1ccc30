"""Model inputs: parsing ``--input-shape``, reading ``.npz`` files, generating sane feeds.

Generated inputs follow what an input is for, judged from its type and name:

1. integer ids (``input_ids`` and the like): uniform in ``[0, vocab)``, where the vocabulary
   is the row count of the embedding table the ids index (a ``Gather`` on an initializer),
   or 100 when no table is found;
2. attention masks (name contains ``mask``): ones (``ragged=True``: each row keeps a random
   prefix, the rest is padding);
3. token types / segment ids: zeros; position ids: ``0..seq-1``;
4. booleans: True; floats (images, features): N(0, 1).

Dynamic dims stay dynamic in the model; to run it they take the user's value, else the
value a same-named dim got on another input, else 1 for the first axis and 16 otherwise,
rounded up on the spatial axes of an image-like input to the multiple the model's strides
need (``graphopt.ir.strides``: 32 for a stride-32 detector with skip connections, which does
not run at 16).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from graphopt.errors import InputSpecError
from graphopt.ir.strides import free_dim_multiple, spatial_strides

DEFAULT_BATCH = 1
DEFAULT_DIM = 16
DEFAULT_VOCAB = 100

Shape = tuple[int, ...]


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]  # int: fixed, str: symbolic, None: unknown

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.dims)


def parse_input_shape(text: str) -> tuple[str, Shape]:
    """``"input_ids:8x128"`` -> ``("input_ids", (8, 128))``."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name or not dims:
        raise InputSpecError(
            f"bad --input-shape '{text}': expected NAME:D1xD2x... such as input_ids:8x128"
        )
    try:
        shape = tuple(int(d) for d in re.split(r"[x,]", dims))
    except ValueError:
        raise InputSpecError(
            f"bad --input-shape '{text}': dims must be positive integers such as 8x128"
        ) from None
    if any(d <= 0 for d in shape):
        raise InputSpecError(f"bad --input-shape '{text}': dims must be positive")
    return name, shape


def parse_input_shapes(texts: Iterable[str]) -> dict[str, Shape]:
    return dict(parse_input_shape(t) for t in texts)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers)."""
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else np.float32
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            else:
                dims.append(None)
        specs.append(InputSpec(vi.name, np.dtype(dtype), tuple(dims)))
    return specs


def check_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Shape]) -> None:
    """Every named input exists and the rank and fixed dims agree."""
    specs = {s.name: s for s in input_specs(model)}
    for name, shape in input_shapes.items():
        if name not in specs:
            raise InputSpecError(
                f"--input-shape names '{name}', which is not a model input "
                f"(inputs: {', '.join(specs) or 'none'})"
            )
        spec = specs[name]
        if len(shape) != len(spec.dims):
            raise InputSpecError(
                f"--input-shape {name}: rank {len(shape)} given, the model's input has rank "
                f"{len(spec.dims)} ({_fmt_dims(spec.dims)})"
            )
        for given, fixed in zip(shape, spec.dims):
            if isinstance(fixed, int) and fixed != given:
                raise InputSpecError(
                    f"--input-shape {name}: {_fmt(shape)} does not fit the model's fixed shape "
                    f"{_fmt_dims(spec.dims)}"
                )


def resolve_shapes(
    model: onnx.ModelProto, input_shapes: Mapping[str, Shape] | None = None
) -> dict[str, Shape]:
    """Concrete shapes for every model input (see the module doc for dynamic dims)."""
    input_shapes = dict(input_shapes or {})
    check_input_shapes(model, input_shapes)
    specs = input_specs(model)
    symbols: dict[str, int] = {}
    for spec in specs:
        if spec.name in input_shapes:
            for dim, value in zip(spec.dims, input_shapes[spec.name]):
                if isinstance(dim, str):
                    symbols.setdefault(dim, value)
    resolved = {}
    strides = spatial_strides(model) if any(s.is_dynamic for s in specs) else ()
    for spec in specs:
        if spec.name in input_shapes:
            resolved[spec.name] = tuple(input_shapes[spec.name])
            continue
        shape = []
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int):
                shape.append(dim)
            elif isinstance(dim, str) and dim in symbols:
                shape.append(symbols[dim])
            else:
                value = DEFAULT_BATCH if axis == 0 else _round_up(
                    DEFAULT_DIM, free_dim_multiple(strides, len(spec.dims), axis))
                if isinstance(dim, str):
                    symbols[dim] = value
                shape.append(value)
        resolved[spec.name] = tuple(shape)
    return resolved


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _embedding_rows(model: onnx.ModelProto, input_name: str) -> int | None:
    """Row count of the table an integer input indexes, following Cast/Unsqueeze/Reshape."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    frontier, seen = {input_name}, set()
    while frontier:
        name = frontier.pop()
        seen.add(name)
        for node in model.graph.node:
            if name not in node.input:
                continue
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
                dims = inits.get(node.input[0])
                if dims:
                    return int(dims[0])
            elif node.op_type in ("Cast", "Unsqueeze", "Reshape", "Flatten", "Identity"):
                frontier.update(o for o in node.output if o not in seen)
    return None


def generate_inputs(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Shape] | None = None,
    *,
    seed: int = 0,
    ragged: bool = False,
) -> dict[str, np.ndarray]:
    """One feed dict for the model (see the module doc for what each input gets)."""
    rng = np.random.default_rng(seed)
    shapes = resolve_shapes(model, input_shapes)
    feeds = {}
    for spec in input_specs(model):
        shape = shapes[spec.name]
        lname = spec.name.lower()
        if spec.dtype == np.bool_:
            arr = np.ones(shape, dtype=np.bool_)
        elif np.issubdtype(spec.dtype, np.integer):
            if "mask" in lname:
                arr = _mask(shape, rng, ragged)
            elif "type" in lname or "segment" in lname:
                arr = np.zeros(shape)
            elif "position" in lname and len(shape) >= 1:
                arr = np.broadcast_to(np.arange(shape[-1]), shape)
            else:
                vocab = _embedding_rows(model, spec.name) or DEFAULT_VOCAB
                arr = rng.integers(0, vocab, size=shape)
            arr = np.ascontiguousarray(arr).astype(spec.dtype)
        elif "mask" in lname:
            arr = _mask(shape, rng, ragged).astype(spec.dtype)
        else:
            arr = rng.standard_normal(shape).astype(spec.dtype)
        feeds[spec.name] = arr
    return feeds


def _mask(shape: Shape, rng: np.random.Generator, ragged: bool) -> np.ndarray:
    mask = np.ones(shape, dtype=np.int64)
    if ragged and len(shape) == 2 and shape[1] > 1:
        for row in range(shape[0]):
            keep = int(rng.integers(max(1, shape[1] // 4), shape[1] + 1))
            mask[row, keep:] = 0
    return mask


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _fmt_dims(dims: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def load_inputs(path: str | Path, model: onnx.ModelProto | None = None) -> list[dict[str, np.ndarray]]:
    """Feed dicts from an ``.npz`` file (one feed) or a folder of ``.npz``/``.npy`` files.

    A folder of ``.npz`` files gives one feed per file; ``.npy`` files in a folder are one
    feed keyed by file stem. With ``model`` given, names must be model inputs and every
    model input must be present.
    """
    path = Path(path)
    if not path.exists():
        raise InputSpecError(f"inputs file not found: {path}")
    feeds: list[dict[str, np.ndarray]] = []
    try:
        if path.is_dir():
            npz = sorted(path.glob("*.npz"))
            npy = sorted(path.glob("*.npy"))
            feeds = [_read_npz(p) for p in npz]
            if npy:
                feeds.append({p.stem: np.load(p, allow_pickle=False) for p in npy})
        else:
            feeds = [_read_npz(path)]
    except (OSError, ValueError) as exc:
        raise InputSpecError(f"cannot read inputs from {path}: {exc}") from exc
    if not feeds:
        raise InputSpecError(f"no .npz or .npy files in {path}")
    if model is not None:
        names = {s.name for s in input_specs(model)}
        for feed in feeds:
            unknown = set(feed) - names
            if unknown:
                raise InputSpecError(
                    f"{path} has arrays {sorted(unknown)} that are not model inputs "
                    f"(inputs: {sorted(names)})"
                )
            missing = names - set(feed)
            if missing:
                raise InputSpecError(f"{path} lacks model inputs {sorted(missing)}")
    return feeds


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npy":
        return {path.stem: np.load(path, allow_pickle=False)}
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
