"""Small pieces every HTML page section uses: inline SVG from a matplotlib figure, escaping,
a table. (Their own module so sections such as ``graphopt.htmlsparsity`` and the page,
``graphopt.htmlreport``, both import them without a cycle.)"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Sequence
from typing import Any


def svg_of(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: inline in HTML
    return re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # RDF creator block


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9})
    return plt


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def table(head: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'
