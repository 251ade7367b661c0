"""Per-point noise streams: every draw of noise for a point comes from a stream fixed by (seed, dataset index,
purpose), so a point's result is the same whichever rank, shard, group or forward batch certifies it, and
whether or not the run was resumed.

A stream serves its draws in fixed-size pieces, each made by one ``torch.randn`` call of the same shape from the
point's own generator. ``torch.randn(a)`` followed by ``torch.randn(b)`` from one generator is not the same as
``torch.randn(a + b)`` (the vectorized kernels consume the generator in blocks), so cutting the draws wherever a
forward batch happens to end would change the noise; fixed pieces make the k-th draw of a point one value.
The same seed gives the same draws on the same kind of device (a CPU and a GPU generator differ).

Every stream's generator depends on all 63 bits of its seed: two streams of a run never share draws. A GPU's
Philox generator takes the whole seed; the CPU's Mersenne Twister keeps only the low 32 bits of ``manual_seed``
(so two of 20,000 points could draw identical noise), and is given its whole state from the seed instead.
Any change to the draws changes rows: bump ``ssmooth.certify.runfolder.SCHEME_VERSION`` with it.
"""
from __future__ import annotations

import functools
import hashlib
import re
from bisect import bisect_right
from collections.abc import Sequence

import numpy as np
import torch

# What the draws are for; streams of different purposes of one point are independent, so CERTIFY's estimation
# never reuses the draws that chose its class or its noise level.
PURPOSES = (
    "selection",  # CERTIFY's n0 draws that choose the class cA
    "estimation",  # CERTIFY's n fresh draws that bound pA
    "prediction",  # PREDICT's n draws
    "level",  # test-time choice of a point's noise level from a grid
    "selector",  # the draws of a smoothed level selector (inductive certificate)
    "pilot",  # draws that choose a per-point sample size (never reused by the bound)
)  # and the cascade's own per level: cascade<k>/selection, cascade<k>/estimation
# One piece holds about this many values whatever the input shape. On a CPU 2^16 (256 KiB in fp32: 83 MNIST
# draws, 21 CIFAR draws, one ImageNet draw): pieces fit whole into a forward batch and are drawn in place; only
# the pieces cut by a batch's ends pass through a buffer (freed with the stream's last draw). On a GPU 2^22
# (5,349 MNIST draws): fewer, larger randn calls, since each is a kernel launch, and copies are cheap there.
# The piece size is part of what fixes the draws; CPU and GPU generators differ anyway.
PIECE_VALUES = 1 << 16
PIECE_VALUES_ACCELERATOR = 1 << 22


def point_seed(seed: int, index: int, purpose: str) -> int:
    """The seed of the stream of dataset item ``index`` for ``purpose`` under run seed ``seed`` (63 bits).

    A cryptographic hash, not Python's ``hash``: the same in every process and on every machine, and seeds of
    neighbouring indices share no structure."""
    if purpose not in PURPOSES and not re.fullmatch(r"cascade\d+/(selection|estimation)", purpose):
        raise ValueError(f"unknown noise purpose {purpose!r}; one of {PURPOSES}")
    digest = hashlib.blake2b(f"ssmooth:{int(seed)}:{int(index)}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` whose draws depend on every bit of ``seed`` (0 <= seed < 2^64).

    On a CPU the Mersenne Twister's 624 state words are the SHAKE-256 expansion of the seed, set the way
    ``manual_seed`` sets them (initial seed, one word left, none served); elsewhere the generator is Philox,
    whose ``manual_seed`` keeps all 64 bits."""
    generator = torch.Generator(device=device)
    if generator.device.type != "cpu":
        return generator.manual_seed(seed)
    state = _cpu_state_template().clone()
    raw = state.numpy()
    raw[0:8] = np.frombuffer(np.uint64(seed).astype("<u8").tobytes(), np.uint8)
    words = np.frombuffer(hashlib.shake_256(f"ssmooth-mt19937:{seed}".encode()).digest(4 * _MT_WORDS), "<u4")
    raw[_MT_OFFSET : _MT_OFFSET + 8 * _MT_WORDS] = np.frombuffer(words.astype("<u8").tobytes(), np.uint8)
    generator.set_state(state)
    return generator


_MT_WORDS = 624
_MT_OFFSET = 24  # the state words (as uint64) follow: initial seed u64, left i32, seeded i32, next u64


@functools.cache
def _cpu_state_template() -> torch.Tensor:
    """A freshly seeded CPU generator's state, after checking that its layout is the one written above (torch
    documents none): a seed's initial value, then state[0] = seed and state[1] from the Twister's init rule."""
    seed = 12345
    state = torch.Generator().manual_seed(seed).get_state()
    head = np.frombuffer(state.numpy()[:_MT_OFFSET + 16].tobytes(), "<u8")
    expected_second = (1812433253 * (seed ^ (seed >> 30)) + 1) % 2**32
    if head[0] != seed or head[1] != 1 + (1 << 32) or head[3] != seed or head[4] != expected_second:
        raise RuntimeError(f"torch {torch.__version__} lays out the CPU generator's state in an unknown way: "
                           "per-point noise streams cannot be seeded with all their bits")
    return state


class NoiseStream:
    """The ``total`` standard normal draws of one point, served in order: ``take(k)`` returns the next k.

    Pieces hold ``piece`` draws each (the last one what is left of ``total``), so the values depend only on
    (seed, shape, total, device kind), never on how the draws are taken."""

    def __init__(self, seed: int, shape: Sequence[int], total: int, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.shape, self.total = tuple(int(s) for s in shape), int(total)
        self.device, self.dtype = torch.device(device), dtype
        values = PIECE_VALUES if self.device.type == "cpu" else PIECE_VALUES_ACCELERATOR
        self.piece = max(1, values // max(1, torch.Size(self.shape).numel()))
        self.generator = seeded_generator(int(seed), self.device)
        self._buffer: torch.Tensor | None = None
        self._used = 0  # draws of the current piece already served
        self.drawn = 0  # draws served so far

    def take(self, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The next ``count`` draws, [count, *shape]; written into ``out`` when given."""
        if self.drawn + count > self.total:
            raise ValueError(f"stream of {self.total} draws asked for draws {self.drawn}..{self.drawn + count - 1}")
        if out is None:
            out = torch.empty((count, *self.shape), device=self.device, dtype=self.dtype)
        filled = 0
        while filled < count:
            if self._buffer is None or self._used == self._buffer.shape[0]:
                size = min(self.piece, self.total - self.drawn - filled)
                if count - filled >= size and out.device == self.device and out.dtype == self.dtype:
                    # A whole piece is wanted: draw it straight into place (the same call, so the same values)
                    torch.randn((size, *self.shape), generator=self.generator, out=out[filled : filled + size])
                    self._buffer, self._used = None, 0
                    filled += size
                    continue
                self._buffer = torch.randn((size, *self.shape), generator=self.generator, device=self.device,
                                           dtype=self.dtype)
                self._used = 0
            step = min(count - filled, self._buffer.shape[0] - self._used)
            out[filled : filled + step].copy_(self._buffer[self._used : self._used + step])
            filled += step
            self._used += step
        self.drawn += count
        if self.drawn == self.total:
            self._buffer = None
        return out


def point_streams(seed: int, indices: Sequence[int], purpose: str, shape: Sequence[int], total,
                  *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[NoiseStream]:
    """One stream per dataset index; ``total`` is the draws each will serve (an int, or one per point)."""
    totals = [int(total)] * len(indices) if isinstance(total, int) else [int(t) for t in total]
    if len(totals) != len(indices):
        raise ValueError(f"{len(totals)} totals for {len(indices)} points")
    return [NoiseStream(point_seed(seed, i, purpose), shape, t, device=device, dtype=dtype)
            for i, t in zip(indices, totals)]


def fill_from_streams(out: torch.Tensor, streams: Sequence[NoiseStream], row_stream: Sequence[int],
                      row_offsets: Sequence[int], start: int, stop: int) -> torch.Tensor:
    """Fill ``out[: stop - start]`` with the draws of flat positions ``start..stop-1``.

    The flat positions are cut into rows, row r holding positions ``row_offsets[r] .. row_offsets[r + 1] - 1``
    and drawing from ``streams[row_stream[r]]``; rows of one stream come in the order that stream serves them.
    """
    row = bisect_right(row_offsets, start) - 1
    position = start
    while position < stop:
        end = min(stop, row_offsets[row + 1])
        streams[row_stream[row]].take(end - position, out=out[position - start : end - start])
        position = end
        row += 1
    return out[: stop - start]
