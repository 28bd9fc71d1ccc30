"""Cosine between two MiniLM models' sentence embeddings (see README.md in this folder).

    python samples/minilm/similarity.py ORIGINAL.onnx PRUNED.onnx --inputs FOLDER_OR_NPZ

Both models run on the same token batches through ONNX Runtime (CPU); a sentence's
embedding is ``last_hidden_state`` averaged over its unmasked tokens (mean pooling, as
sentence-transformers does for all-MiniLM-L6-v2). Prints the mean and the worst cosine
over the sentences (1.0 is identical) and the Spearman correlation between the two models'
similarity ranks over every pair of sentences (what a search or clustering consumes).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original")
    parser.add_argument("pruned")
    parser.add_argument("--inputs", required=True, help="an .npz file or a folder of them")
    args = parser.parse_args(argv)

    import graphopt
    from graphopt.ir.inputs import load_inputs
    from graphopt.data.text import mean_pooled_embeddings, row_cosines, similarity_spearman

    original = graphopt.load(args.original)
    pruned = graphopt.load(args.pruned)
    feeds = load_inputs(args.inputs, original)
    a, b = mean_pooled_embeddings(original, feeds), mean_pooled_embeddings(pruned, feeds)
    cos = row_cosines(a, b)
    print(f"mean-pooled embedding cosine over {len(cos)} sentences: mean {cos.mean():.4f}, "
          f"min {cos.min():.4f}; similarity-rank Spearman over {len(cos) * (len(cos) - 1) // 2} "
          f"pairs: {similarity_spearman(a, b):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
