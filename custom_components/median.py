"""Exact 3D median filter, ``scipy.ndimage.median_filter`` to the bit, as a sorting network over whole arrays.

The protocol median-filters every residual volume and scipy's filter dominated the scoring time; this one is several
times faster (``benchmarks/evaluation.py`` times both). Odd-even merges of whole-array min/max build sorted runs along
z, then y (shared by every window holding them); two outputs neighbouring in x share their k-1 middle rows, sorted
once, and each selects its rank from that core and its own extra row. Unneeded operations are pruned. Min/max return
one of their inputs, so the result is exactly scipy's median.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

__all__ = ["median_filter_3d", "median_of_padded"]


class _Network:
    """A program of whole-array ``min`` / ``max`` operations in single-assignment form."""

    def __init__(self) -> None:
        self.ops: list[tuple] = []

    def add(self, *op) -> int:
        self.ops.append(op)
        return len(self.ops) - 1

    def shifted(self, wires: Sequence[int], how: tuple) -> list[int]:
        return [self.add("load", wire, how) for wire in wires]

    def merge(self, a: Sequence[int], b: Sequence[int]) -> list[int]:
        """Batcher's odd-even merge of two sorted wire lists (any lengths)."""
        if not a or not b:
            return list(a) + list(b)
        if len(a) == 1 and len(b) == 1:
            return [self.add("min", a[0], b[0]), self.add("max", a[0], b[0])]
        even = self.merge(a[0::2], b[0::2])
        odd = self.merge(a[1::2], b[1::2])
        out, i = [even[0]], 0
        while i + 1 < len(even) and i < len(odd):
            out += [self.add("min", even[i + 1], odd[i]), self.add("max", even[i + 1], odd[i])]
            i += 1
        return out + even[i + 1 :] + odd[i:]

    def select(self, a: Sequence[int], b: Sequence[int], rank: int) -> int:
        """Element ``rank`` of the union of sorted ``a`` and ``b``: min over i + j = rank + 1 of max(a[i-1], b[j-1])."""
        terms = []
        for j in range(max(0, rank + 1 - len(a)), min(len(b), rank + 1) + 1):
            i = rank + 1 - j
            if i == 0:
                terms.append(b[j - 1])
            elif j == 0:
                terms.append(a[i - 1])
            else:
                terms.append(self.add("max", a[i - 1], b[j - 1]))
        out = terms[0]
        for term in terms[1:]:
            out = self.add("min", out, term)
        return out


@functools.lru_cache(maxsize=None)
def _median_program(size: int) -> tuple[list, int, int]:
    """The pruned network for an odd ``size``: (ops with the wires they free, even output, odd output)."""
    net = _Network()
    source = net.add("input")
    runs: dict = {}

    def flat_run(length: int, axis: str, base: list[int]) -> list[int]:
        """Sorted values of ``length`` consecutive positions along z or y, from power-of-two halves."""
        if (axis, length) not in runs:
            half = 1 << (length - 1).bit_length() >> 1
            runs[axis, length] = base if length == 1 else net.merge(
                flat_run(half, axis, base), net.shifted(flat_run(length - half, axis, base), ("flat", axis, half)))
        return runs[axis, length]

    columns = flat_run(size, "y", flat_run(size, "z", [source]))  # size**2 sorted wires
    by_parity = {parity: net.shifted(columns, ("rows0", parity)) for parity in (0, 1)}

    def row_run(length: int, parity: int) -> list[int]:
        """Sorted values of ``length`` consecutive x-rows starting at rows of the given parity."""
        if ("x", length, parity) not in runs:
            half = 1 << (length - 1).bit_length() >> 1
            upper = parity + half
            runs["x", length, parity] = by_parity[parity] if length == 1 else net.merge(
                row_run(half, parity), net.shifted(row_run(length - half, upper % 2), ("rows", upper // 2)))
        return runs["x", length, parity]

    rank = size**3 // 2
    core = row_run(size - 1, 1)  # rows 2t+1 .. 2t+size-1, shared by outputs 2t and 2t+1
    even = net.select(core, by_parity[0], rank)  # extra row 2t
    odd = net.select(core, net.shifted(by_parity[1], ("rows", (size - 1) // 2)), rank)  # extra row 2t+size

    wires = {index: [arg for arg in op[1:3] if isinstance(arg, int)] for index, op in enumerate(net.ops)}
    needed = {even, odd}
    for index in reversed(range(len(net.ops))):
        if index in needed:
            needed.update(wires[index])
    last_use = {arg: index for index in sorted(needed) for arg in wires[index]}
    program = [(i, net.ops[i], [a for a in set(wires[i]) if last_use[a] == i]) for i in sorted(needed)]
    return program, even, odd


def _median_block(block: np.ndarray, size: int) -> np.ndarray:
    """Median of every ``size``-cube of ``block`` (R, Yp, Zp), R = 2T + size - 1 -> (2T, Yp-size+1, Zp-size+1)."""
    program, even, odd = _median_program(size)
    rows, yp, zp = block.shape
    pairs = (rows - size + 1) // 2
    row_len = yp * zp
    flat = np.zeros(rows * row_len + (size - 1) * (zp + 1), dtype=block.dtype)
    flat[: rows * row_len] = block.reshape(-1)
    values: dict[int, np.ndarray] = {}
    for index, op, freed in program:
        kind = op[0]
        if kind == "input":
            value = flat
        elif kind == "load":
            source, how = values[op[1]], op[2]
            if how[0] == "flat":
                value = source[how[2] * (1 if how[1] == "z" else zp) :]
            elif how[0] == "rows0":
                value = source[: rows * row_len].reshape(rows, row_len)[how[1] :: 2]
            else:
                value = source[how[1] :]
        else:
            x, y = values[op[1]], values[op[2]]
            n = min(len(x), len(y))
            value = np.minimum(x[:n], y[:n]) if kind == "min" else np.maximum(x[:n], y[:n])
        values[index] = value
        for wire in freed:
            del values[wire]
    out = np.stack([values[even][:pairs], values[odd][:pairs]], axis=1).reshape(2 * pairs, yp, zp)
    return out[:, : yp - size + 1, : zp - size + 1]


def median_of_padded(padded: np.ndarray, size: int, chunk_elements: int = 160_000) -> np.ndarray:
    """Median filter of an array already padded by ``size // 2`` on every side (valid part only)."""
    out_shape = tuple(n - size + 1 for n in padded.shape)
    if size == 1:
        return padded.copy()
    out = np.empty(out_shape, dtype=padded.dtype)
    row_len = padded.shape[1] * padded.shape[2]
    chunk = max(2, 2 * ((chunk_elements // row_len) // 2))
    for x0 in range(0, out_shape[0], chunk):
        n = min(chunk, out_shape[0] - x0)
        rows = 2 * ((n + 1) // 2) + size - 1
        block = padded[x0 : x0 + rows]
        if block.shape[0] < rows:  # odd tail: one extra row, its output is dropped
            block = np.concatenate([block, np.zeros((rows - len(block),) + block.shape[1:], block.dtype)])
        out[x0 : x0 + n] = _median_block(np.ascontiguousarray(block), size)[:n]
    return out


def median_filter_3d(volume, size: int = 5) -> np.ndarray:
    """``scipy.ndimage.median_filter(volume, size=size)`` (mode "reflect": d c b a | a b c d, same dtype) for an odd
    ``size`` and finite values (NaN has no rank)."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"median_filter_3d: expected a 3D volume, got shape {volume.shape}.")
    if size < 1 or size % 2 == 0:
        raise ValueError(f"median_filter_3d: size must be a positive odd number, got {size}.")
    return median_of_padded(np.pad(volume, size // 2, mode="symmetric"), size)
