"""A seeded Brownian motion that reproduces torchsde 0.2.6's `BrownianTree` number for number, without torchsde.

torchsde's tree (a `BrownianInterval` with `halfway_tree=True`, tol 1e-6, pool_size 24, no Lévy area) samples the
increment over its whole range [t0, t1] from a seed derived from the entropy, and fills in any sub-interval by
Brownian bridges over a dyadic tree: every node splits at its halfway point (rounded to the tolerance), and the
left child's increment is drawn from the bridge law given the parent's with a seed that numpy's `SeedSequence`
derives from (entropy, the node's path, its depth). A query [ta, tb] is answered by the sum, left to right, of the
maximal tree nodes that tile it. The path therefore depends only on the entropy, never on which points were asked
for or in what order, and a node's value is a pure function of its ancestors': torchsde's LRU cache (and the
draws kept here) only saves time. torchsde asks its SeedSequences for 3 or 4 words and uses the first for these
increments; a SeedSequence's words do not depend on how many are asked for, so one word is drawn here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

# torchsde.BrownianTree's defaults, which ComfyUI keeps: the tree resolves time to 1e-6 (decimal rounding).
TOLERANCE_DIGITS = 6
POOL_SIZE = 24


def _round(t: float) -> float:
    return round(t, TOLERANCE_DIGITS)


def _seeded_normal(seed: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # torchsde seeds a generator on the tree's device: a CUDA tree draws other numbers than a CPU tree.
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(shape, dtype=dtype, generator=generator, device=device)


class _Node:
    """A sub-interval of the tree; its children (split at the rounded halfway point) are made on first need."""

    __slots__ = ("start", "end", "depth", "path", "parent", "is_left", "_children")

    def __init__(self, start: float, end: float, depth: int, path: int, parent: _Node | None, is_left: bool):
        self.start, self.end = start, end
        self.depth, self.path = depth, path  # path: the left(0)/right(1) turns from the root, as bits
        self.parent, self.is_left = parent, is_left
        self._children: tuple[_Node, _Node] | None = None

    def children(self) -> tuple[_Node, _Node]:
        if self._children is None:
            middle = _round(0.5 * (self.end + self.start))
            depth, path = self.depth + 1, 2 * self.path
            self._children = (_Node(self.start, middle, depth, path, self, True),
                              _Node(middle, self.end, depth, path + 1, self, False))
        return self._children


class BrownianTree:
    """Brownian motion W on [t0, t1] with W(t0) = 0, seeded by `entropy`, on `device` in `dtype`:
    `increment(ta, tb)` equals torchsde 0.2.6 `BrownianTree(t0, w0, t1, entropy=entropy)(ta, tb)` for w0 of that
    shape, dtype and device."""

    def __init__(self, t0: float, t1: float, shape: Sequence[int], *, entropy: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        t0, t1 = float(t0), float(t1)
        if not t0 <= t1:
            raise ValueError(f"a Brownian tree needs t0 <= t1, got t0={t0}, t1={t1}")
        if isinstance(entropy, bool) or not isinstance(entropy, numbers.Integral) or entropy < 0:
            raise ValueError(f"entropy must be a non-negative int (a seed), got {entropy!r}")
        entropy = int(entropy)
        self.t0, self.t1, self.entropy = t0, t1, entropy
        self.shape, self.dtype, self.device = tuple(int(s) for s in shape), dtype, torch.device(device)
        self._root = _Node(_round(t0), _round(t1), 0, 0, None, True)
        # The root's seed comes from the bare entropy; splits use (entropy, spawn key) below.
        root_seed = np.random.SeedSequence(entropy=entropy, pool_size=POOL_SIZE).generate_state(1)[0]
        self._root_increment = _seeded_normal(root_seed, self.shape, dtype, self.device) * math.sqrt(t1 - t0)
        # The left child's increment of each split node near the last query's end points (see `_forget`).
        self._left_increments: dict[_Node, torch.Tensor] = {}

    def increment(self, ta: float, tb: float) -> torch.Tensor:
        """W(tb) - W(ta) for t0 <= ta <= tb <= t1 (query times a float32 rounding outside the range are clamped,
        as torchsde clamps them); a new tensor the caller may modify."""
        ta, tb = self._clamp(float(ta)), self._clamp(float(tb))
        if ta > tb:
            raise ValueError(f"expected ta <= tb, got ta={ta}, tb={tb}")
        if ta == tb:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        ta, tb = _round(ta), _round(tb)
        if ta == tb:
            # torchsde recurses without end here (RecursionError); the increment is below the tree's resolution.
            raise ValueError(f"query times {ta} and {tb} differ by less than the tree's resolution "
                             f"1e-{TOLERANCE_DIGITS}")
        pieces: list[_Node] = []
        self._tile(self._root, ta, tb, pieces)
        values = {self._root: self._root_increment}
        total = self._value(pieces[0], values).clone()
        for piece in pieces[1:]:
            total = total + self._value(piece, values)
        self._forget(ta, tb)
        return total

    def _clamp(self, t: float) -> float:
        # Queries come as float32 (ComfyUI casts them) while t0, t1 may be float64: allow that rounding, no more.
        slack = max(10.0**-TOLERANCE_DIGITS, 2.0**-23 * max(abs(self.t0), abs(self.t1)))
        if not self.t0 - slack <= t <= self.t1 + slack:
            raise ValueError(f"query time {t} lies outside the tree's range [{self.t0}, {self.t1}]")
        return min(max(t, self._root.start), self._root.end)

    def _tile(self, node: _Node, ta: float, tb: float, out: list[_Node]) -> None:
        """The maximal nodes covering [ta, tb], left to right (a segment-tree decomposition)."""
        while not (ta == node.start and tb == node.end):
            left, right = node.children()
            if tb <= left.end:
                node = left
            elif ta >= right.start:
                node = right
            else:
                self._tile(left, ta, left.end, out)
                node, ta = right, right.start
        out.append(node)

    def _value(self, node: _Node, values: dict[_Node, torch.Tensor]) -> torch.Tensor:
        """The increment over `node`, walking down from the root: left child = the bridge draw, right child =
        parent - left, the operations torchsde uses (so the float roundings agree bit for bit)."""
        value = values.get(node)
        if value is None:
            parent_value = self._value(node.parent, values)
            left = self._left_increment(node.parent, parent_value)
            value = left if node.is_left else parent_value - left
            values[node] = value
        return value

    def _left_increment(self, node: _Node, value: torch.Tensor) -> torch.Tensor:
        """The Brownian bridge (Lévy's construction): W over node's left half given W over node is `value`."""
        left = self._left_increments.get(node)
        if left is None:
            middle = node.children()[0].end
            left_length, right_length = middle - node.start, node.end - middle
            reciprocal = 1 / (node.end - node.start)
            seed = np.random.SeedSequence(entropy=self.entropy, spawn_key=(node.path, node.depth),
                                          pool_size=POOL_SIZE).generate_state(1)[0]
            # torchsde's `left_diff * W * h_reciprocal + sqrt(var) * noise`, op for op (in place: no new buffers).
            mean = value * left_length
            mean.mul_(reciprocal)
            spread = math.sqrt(left_length * right_length * reciprocal)
            left = _seeded_normal(seed, self.shape, self.dtype, self.device).mul_(spread)
            left.add_(mean)
            self._left_increments[node] = left
        return left

    def _forget(self, ta: float, tb: float) -> None:
        """Keep the draws along the paths to the last query's end points: a sampler's next query starts where this
        one ended, so it needs exactly those (the values never depend on what is kept, only the time does)."""
        self._left_increments = {node: left for node, left in self._left_increments.items()
                                 if node.start <= ta <= node.end or node.start <= tb <= node.end}
