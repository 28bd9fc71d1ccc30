"""Held-apart English sentence traffic that ships with every Python: the prose sentences of
the Python Language Reference (``pydoc_data.topics``, the text ``help()`` shows).

    from traffic import doc_sentences
    sentences = doc_sentences(320)          # deterministic: same list on every machine
    python benchmarks/traffic.py            # count, length spread, real-token fractions

What it is, honestly: technical English written by people (the Python reference), not
search queries or chat. Paragraphs indented as code examples are dropped, and so are
sentences holding code-like characters (brackets, ``=``, backticks, ``>>>``); what stays is
3-60 words, capitalised, ending in ``.``/``?``/``!``, deduplicated, in a fixed shuffled
order (seed 0). With the all-MiniLM-L6-v2 tokenizer the lengths run from ~5 to ~80 tokens
(median ~22), so real tokens are about 55% of the computed ones in batches of 8 and 42% in
batches of 32 padded to the longest: the mix of short and long sentences served traffic has.
It is apart from ``graphopt/data/sentences.txt`` (the shipped calibration sentences).
"""

from __future__ import annotations

import random
import re
import sys

_CODE = re.compile(r"[{}\[\]<>=*_`|\\]|>>>|\(\)")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def doc_sentences(count: int | None = None, seed: int = 0) -> list[str]:
    """Prose sentences of the installed Python's reference text (module doc)."""
    import pydoc_data.topics as topics

    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", "\n".join(topics.topics.values())):
        if paragraph.startswith("   "):  # indented: code examples and grammar
            continue
        for s in _SPLIT.split(" ".join(paragraph.split())):
            if (re.match(r"^[A-Z][a-z]", s) and s.endswith((".", "?", "!"))
                    and not _CODE.search(s) and 3 <= len(s.split()) <= 60):
                out.append(s)
    out = list(dict.fromkeys(out))
    random.Random(seed).shuffle(out)
    return out[:count] if count else out


def real_fraction(feeds) -> float:
    """Real tokens / computed tokens over a list of token feeds."""
    return sum(int(f["attention_mask"].sum()) for f in feeds) / sum(
        f["attention_mask"].size for f in feeds)


def main() -> int:
    import os

    import numpy as np

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from graphopt.data.text import encode, load_tokenizer, minilm_folder

    sentences = doc_sentences()
    tok = load_tokenizer(minilm_folder())
    lengths = np.array([len(tok(s)["input_ids"]) for s in sentences])
    print(f"{len(sentences)} sentences; tokens min {lengths.min()} median "
          f"{np.median(lengths):.0f} mean {lengths.mean():.1f} p90 "
          f"{np.percentile(lengths, 90):.0f} max {lengths.max()}")
    for batch, padding in ((8, "longest"), (32, "longest"), (32, "max_length")):
        feeds = encode(sentences, tok, batch_size=batch, padding=padding, max_length=128)
        print(f"batches of {batch}, padded to {'the longest' if padding == 'longest' else 128}: "
              f"real tokens {real_fraction(feeds):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
