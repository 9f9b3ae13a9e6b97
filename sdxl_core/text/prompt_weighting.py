"""ComfyUI's prompt-weighting syntax, parsed with the semantics of ComfyUI `comfy/sd1_clip.py` (`escape_important`,
`parse_parentheses`, `token_weights`, `unescape_important`; checked against Comfy-Org/ComfyUI a125cd84, 2025-10).

- `(text)` multiplies the enclosing weight by 1.1; nesting compounds: `((text))` is 1.21.
- `(text:w)` *sets* the weight to w, replacing (not multiplying) the enclosing one: `((a:1.5))` is 1.5, while a
  weight outside a group applies to the group's inner 1.1: `((a):1.5)` gives a 1.65.
- The weight is whatever Python's `float()` accepts after the group's last ':'; if that fails the ':' is plain text.
  A ':' at the group's first character is plain text.
- `\\(` and `\\)` are literal parentheses. Unbalanced parentheses stay in the text as ComfyUI leaves them.
"""

from __future__ import annotations

# ComfyUI's placeholders for escaped parentheses: invisible to the parser, restored afterwards.
_ESCAPED_CLOSE = "\0\1"
_ESCAPED_OPEN = "\0\2"
NESTING_FACTOR = 1.1


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (segment, weight) pairs (ComfyUI `token_weights` after `escape_important`)."""
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    escaped = text.replace("\\)", _ESCAPED_CLOSE).replace("\\(", _ESCAPED_OPEN)
    return [(_unescape(segment), weight) for segment, weight in _weigh(escaped, 1.0)]


def _unescape(text: str) -> str:
    return text.replace(_ESCAPED_CLOSE, ")").replace(_ESCAPED_OPEN, "(")


def _weigh(text: str, weight: float) -> list[tuple[str, float]]:
    pairs: list[tuple[str, float]] = []
    for part in _split_top_level_groups(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner = part[1:-1]
            group_weight = weight * NESTING_FACTOR
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    group_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            pairs += _weigh(inner, group_weight)
        else:
            pairs.append((part, weight))
    return pairs


def _split_top_level_groups(text: str) -> list[str]:
    """Split into plain runs and top-level '(...)' groups (ComfyUI `parse_parentheses`, including how it treats
    an unmatched ')': the depth goes negative and the characters stay in the current run)."""
    parts: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    parts.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                parts.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        parts.append(current)
    return parts
