"""Timing checks that a parser's cost grows linearly with the size of its input.

For parsers fed by clients: one whose time grows faster than its input (a
backtracking regular expression, a quadratic loop) lets one request hold the
event loop. Absolute times say little on a shared machine; how the time grows
says a lot: four times the input costs a linear parser about four times the
time, a quadratic one sixteen, a cubic one sixty-four.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["MAX_RATIO", "SIZES", "assert_linear", "growth"]

T = TypeVar("T")

#: Input sizes, by fours up to 64 KiB. The small ones come first so that a
#: super-linear parser fails in a second rather than spending hours on 64 KiB.
SIZES = (256, 1 << 10, 4 << 10, 16 << 10, 64 << 10)
#: Largest time growth allowed for four times the input: linear is ~4; the
#: margin is for noise, and quadratic (16) is still well above it.
MAX_RATIO = 10.0
#: Repeats of each timing; the fastest counts, as noise only ever slows a run.
REPEATS = 5
#: Shortest timed run, in seconds: well above the clock's resolution.
MIN_RUN = 0.002


def _run(
    parse: Callable[[T], object], value: T, loops: int, refusals: tuple[type[Exception], ...]
) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        with contextlib.suppress(*refusals):  # a refusal is a fine answer, if quick
            parse(value)
    return time.perf_counter() - start


def growth(
    parse: Callable[[T], object],
    small: T,
    large: T,
    refusals: tuple[type[Exception], ...] = (ValueError,),
) -> float:
    """How many times longer `parse(large)` takes than `parse(small)`, the best of a few runs.

    The large input is timed again only while it looks too slow, so a linear
    parser costs one run of it and a super-linear one no more than `REPEATS`.
    """
    loops = 1
    while _run(parse, small, loops, refusals) < MIN_RUN and loops < 1 << 20:
        loops *= 2
    fastest_small = min(_run(parse, small, loops, refusals) for _ in range(REPEATS))
    fastest_large = float("inf")
    for _ in range(REPEATS):
        fastest_large = min(fastest_large, _run(parse, large, loops, refusals))
        if fastest_large / fastest_small < MAX_RATIO:
            break
    return fastest_large / fastest_small


def assert_linear(
    parse: Callable[[T], object],
    worst: Callable[[int], T],
    refusals: tuple[type[Exception], ...] = (ValueError,),
) -> None:
    """Fail if `parse(worst(n))` grows faster than linearly in n, up to n = 64 KiB.

    `worst(n)` makes the parser's worst input of about n characters; raising
    one of `refusals` counts as an answer.
    """
    for small, large in itertools.pairwise(SIZES):
        ratio = growth(parse, worst(small), worst(large), refusals)
        assert ratio < MAX_RATIO, (
            f"{large / small:.0f} times the input took {ratio:.0f} times as long"
            f" ({small} -> {large} characters): the parser is not linear"
        )
