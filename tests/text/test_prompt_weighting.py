import pytest

from sdxl_core.text.prompt_weighting import parse_prompt_weights


def _approx(pairs):
    return [(text, pytest.approx(weight, rel=1e-12)) for text, weight in pairs]


@pytest.mark.parametrize("prompt, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("(foo)", [("foo", 1.1)]),
    ("(foo)(bar)", [("foo", 1.1), ("bar", 1.1)]),
    ("((foo))", [("foo", 1.1 * 1.1)]),
    ("(foo:2.0)", [("foo", 2.0)]),
    ("(foo:0.0)", [("foo", 0.0)]),
    # An explicit weight replaces the enclosing one; a weight outside a group scales the group's inner 1.1.
    ("((foo:1.5))", [("foo", 1.5)]),
    ("((foo):1.5)", [("foo", 1.5 * 1.1)]),
    ("((foo:1.0):0.0)", [("foo", 1.0)]),
    # The examples of ComfyUI issue #4610, as ComfyUI's docstring pins them.
    ("foo ((((lol (cat:666) attack:100)))) baz",
     [("foo ", 1.0), ("lol ", 100.0), ("cat", 666.0), (" attack", 100.0), (" baz", 1.0)]),
    ("foo ((((lol (cat:666) attack):100))) baz",
     [("foo ", 1.0), ("lol ", 110.0), ("cat", 666.0), (" attack", 110.0), (" baz", 1.0)]),
    ("a (red:1.3) car, (blue sky)", [("a ", 1.0), ("red", 1.3), (" car, ", 1.0), ("blue sky", 1.1)]),
])
def test_weights_as_comfyui(prompt, expected):
    assert parse_prompt_weights(prompt) == _approx(expected)


@pytest.mark.parametrize("prompt, expected", [
    # Escaped parentheses are text.
    (r"\(foo\) (bar)", [("(foo) ", 1.0), ("bar", 1.1)]),
    (r"(a \(b\):1.2)", [("a (b)", 1.2)]),
    # The weight is the float after the last ':'; anything else leaves the ':' as text.
    ("(time: 12:30)", [("time: 12", 30.0)]),
    ("(ratio a:b)", [("ratio a:b", 1.1)]),
    ("(a:b:0.5)", [("a:b", 0.5)]),
    ("(:1.5)", [(":1.5", 1.1)]),
    ("(x: 2 )", [("x", 2.0)]),
    ("(x:1e1)", [("x", 10.0)]),
    # Unbalanced parentheses are kept the way ComfyUI keeps them.
    ("(unclosed", [("(unclosed", 1.0)]),
    ("a) b (c)", [("a) b (c)", 1.0)]),
    ("()x", [("x", 1.0)]),
    ("", []),
])
def test_edge_cases(prompt, expected):
    assert parse_prompt_weights(prompt) == _approx(expected)


def test_rejects_non_strings():
    with pytest.raises(TypeError, match="str"):
        parse_prompt_weights(1.5)
