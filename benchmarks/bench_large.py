"""A model over 2 GB end to end: time and peak RSS of every step a user runs.

    python benchmarks/bench_large.py                       # 2.82 GB model, the table
    python benchmarks/bench_large.py --layers 3 --ffn 8192 # smaller (0.8 GB), quicker
    python benchmarks/bench_large.py --keep DIR            # keep the files in DIR

1. The model is written here, weights straight to external data with numpy (never one
   protobuf message): ``--layers`` residual MLP blocks ``x + W2·relu(W1·x + b1) + b2``
   (hidden ``--hidden``, FFN ``--ffn``, float32, dynamic batch). Defaults: 6 × 4096 × 14336,
   2.82 GB of weights, over protobuf's 2 GB limit (pruned by 0.2: 2.25 GB, still over).
2. Each step runs as a fresh ``graphopt`` CLI process under ``/usr/bin/time -v``: its wall
   time and peak RSS (``Maximum resident set size``) are the step's, and the ratio is peak
   RSS over the weights' size (the issue's bound: about 3×). Steps: ``inspect`` (load and
   analysis), ``optimize --pass cleanup`` (load, a lossless pass verified against the input,
   save), ``optimize --pass prune-neurons`` (a pruning pass, verified to run, save with
   external data), ``validate`` (original against pruned through ORT sessions made from the
   files) and ``bench --vs`` (both timed A/B).
3. Outputs are checked as written: the ``.onnx`` with its ``.onnx.data`` beside it.
4. The files are deleted at the end unless ``--keep`` names a folder to keep them in.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

_ALIGN = 4096


def write_large_model(path: Path, *, layers: int, hidden: int, ffn: int, seed: int = 0) -> int:
    """Write the residual-MLP model to ``path`` (+ ``path.data``); returns the weight bytes.

    Each weight is generated and appended to the data file one at a time, so writing costs
    one tensor of memory, not the model."""
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    inits: list[TensorProto] = []
    nodes = []
    offset = 0
    with open(path.parent / data_name, "wb") as fh:
        def add(name: str, shape: tuple[int, ...], scale: float) -> str:
            nonlocal offset
            arr = (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))
            pad = (-offset) % _ALIGN
            fh.write(b"\0" * pad)
            offset += pad
            arr.tofile(fh)
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)),
                               ("length", str(arr.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            offset += arr.nbytes
            inits.append(t)
            return name

        x = "x"
        for i in range(layers):
            w1 = add(f"layer{i}.w1", (hidden, ffn), hidden ** -0.5)
            b1 = add(f"layer{i}.b1", (ffn,), 0.1)
            w2 = add(f"layer{i}.w2", (ffn, hidden), (2 * ffn) ** -0.5)
            b2 = add(f"layer{i}.b2", (hidden,), 0.1)
            p = f"layer{i}."
            nodes += [
                helper.make_node("MatMul", [x, w1], [p + "mm1"], name=p + "mm1"),
                helper.make_node("Add", [p + "mm1", b1], [p + "pre"], name=p + "add1"),
                helper.make_node("Relu", [p + "pre"], [p + "act"], name=p + "relu"),
                helper.make_node("MatMul", [p + "act", w2], [p + "mm2"], name=p + "mm2"),
                helper.make_node("Add", [p + "mm2", b2], [p + "mlp"], name=p + "add2"),
                helper.make_node("Add", [x, p + "mlp"], [p + "out"], name=p + "residual"),
            ]
            x = p + "out"
        nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    graph = helper.make_graph(
        nodes, "large_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return offset


_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
_WALL = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)")


def _seconds(text: str) -> float:
    parts = [float(p) for p in text.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


_CLI = "import sys; from graphopt.cli.commands import main; sys.exit(main())"
_SAVE = "import sys, graphopt; graphopt.save(graphopt.load(sys.argv[1]), sys.argv[2])"


def run_step(args: list[str], code: str = _CLI) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, the command's stdout) of ``graphopt ARGS`` (or of
    the Python ``code`` given ARGS)."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-c", code, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rss = _RSS.search(proc.stderr)
    wall = _WALL.search(proc.stderr)
    if proc.returncode != 0 or rss is None or wall is None:
        tail = "\n".join(l for l in proc.stderr.splitlines() if not l.startswith("\t"))[-2000:]
        raise SystemExit(f"step failed (exit {proc.returncode}): graphopt {' '.join(args)}\n"
                         f"{proc.stdout[-2000:]}\n{tail}")
    return _seconds(wall.group(1)), int(rss.group(1)) * 1024, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--ratio", type=float, default=0.2,
                        help="prune-neurons ratio (0.2 keeps the pruned model over 2 GB)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write (and keep) the files in this folder")
    args = parser.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="graphopt-large-", dir=os.environ.get(
        "GRAPHOPT_LARGE_DIR", "/work/tmp" if Path("/work/tmp").is_dir() else None)))
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    need = 4 * 4 * args.layers * (2 * args.hidden * args.ffn + args.ffn + args.hidden)
    if free < need:
        raise SystemExit(f"error: {folder} has {free / 2**30:.1f} GB free; this run needs "
                         f"about {need / 2**30:.1f} GB")
    try:
        src = folder / "large.onnx"
        start = time.perf_counter()
        weights = write_large_model(src, layers=args.layers, hidden=args.hidden, ffn=args.ffn)
        print(f"model: {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}: "
              f"{weights / 2**30:.2f} GiB of weights ({weights / 1e9:.2f} GB), written in "
              f"{time.perf_counter() - start:.1f} s to {folder}")
        clean, pruned = folder / "cleanup.onnx", folder / "pruned.onnx"
        saved = folder / "saved.onnx"
        steps = [
            ("load + inspect", ["inspect", str(src)]),
            ("load + save (graphopt.load, graphopt.save)", [str(src), str(saved)]),
            ("optimize cleanup (verified, saved)",
             ["optimize", str(src), "-o", str(clean), "--pass", "cleanup"]),
            (f"optimize prune-neurons:ratio={args.ratio} (saved)",
             ["optimize", str(src), "-o", str(pruned), "--pass",
              f"prune-neurons:ratio={args.ratio},importance=l1"]),
            ("validate original vs pruned", ["validate", str(src), str(pruned), "--count", "1",
                                             "--atol", "1e9", "--rtol", "1e9"]),
            ("bench pruned --vs original", ["bench", str(pruned), "--vs", str(src),
                                            "--rounds", "5", "--warmup", "1", "--min-time", "0",
                                            "--threads", "2"]),
        ]
        rows = []
        for label, step in steps:
            seconds, rss, out = run_step(step, _SAVE if step[0] == str(src) else _CLI)
            rows.append((label, seconds, rss))
            print(f"  {label}: {seconds:.1f} s, peak RSS {rss / 2**30:.2f} GiB "
                  f"({rss / weights:.2f}x weights)", flush=True)
            if step[0] in ("bench", "validate"):
                print("    " + "\n    ".join(out.strip().splitlines()[-5:]))
            if step[0] == str(src):
                saved.unlink()
                (folder / "saved.onnx.data").unlink(missing_ok=True)
        for out_path in (clean, pruned):
            data = out_path.parent / (out_path.name + ".data")
            print(f"{out_path.name}: {out_path.stat().st_size / 2**20:.1f} MiB + "
                  f"{data.name} {data.stat().st_size / 2**30:.2f} GiB"
                  if data.exists() else f"{out_path.name}: no external data file!")
        print()
        print(f"weights {weights / 2**30:.2f} GiB; each step a fresh process (/usr/bin/time -v)")
        print("| step | wall s | peak RSS GiB | peak RSS / weights |")
        print("|---|---|---|---|")
        for label, seconds, rss in rows:
            print(f"| {label} | {seconds:.1f} | {rss / 2**30:.2f} | {rss / weights:.2f}x |")
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
