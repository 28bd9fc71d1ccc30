"""graphopt.analysis.registry: handlers and rewriters register independently."""

from onnx import helper

from graphopt.analysis.registry import axis_index, handler_for, handles, rewrites


def test_rewriter_may_be_declared_before_its_handler():
    """``@rewrites`` used before ``@handles`` for the same op no longer raises KeyError;
    the lookup pairs them."""

    def rewrite(nv, ed):  # pragma: no cover - only looked up
        pass

    def couple(nv):  # pragma: no cover - only looked up
        pass

    rewrites("OrderTest", domain="test.graphopt")(rewrite)
    node = helper.make_node("OrderTest", ["x"], ["y"], domain="test.graphopt")
    assert handler_for(node) is None  # a rewriter alone is no handler: the op stays a barrier
    handles("OrderTest", domain="test.graphopt")(couple)
    handler = handler_for(node)
    assert handler.couple is couple and handler.rewrite is rewrite


def test_onnx_domain_spellings_and_axis_index():
    """"" and "ai.onnx" name the same domain; negative axes count from the end."""
    relu = handler_for(helper.make_node("Relu", ["x"], ["y"], domain="ai.onnx"))
    assert relu is not None
    assert relu.couple is handler_for(helper.make_node("Relu", ["x"], ["y"])).couple
    assert axis_index(-1, 4) == 3 and axis_index(1, 4) == 1
