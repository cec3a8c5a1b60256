"""Timing checks that a parser's cost grows linearly with the size of its input.

For parsers fed by clients: one whose time grows faster than its input (a
backtracking regular expression, a quadratic loop) lets one request hold the
event loop. Absolute times say little on a shared machine; how the time grows
says a lot: four times the input costs a linear parser about four times the
time, a quadratic one sixteen, a cubic one sixty-four.

The time is this thread's CPU time, not the wall clock's: on a loaded machine
(CI's two cores running the suite and more) a run is often taken off its core
for a while, and the longer run more often, which made a linear parser's
growth look quadratic. CPU time grows with the work done only.
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
#: Most timings of each size, taken in turns; the fastest counts, as noise only
#: ever slows a run down. At least `MIN_ATTEMPTS` before any verdict.
ATTEMPTS = 10
MIN_ATTEMPTS = 3
#: Shortest timed run, in CPU seconds: well above the clock's resolution.
MIN_RUN = 0.002


def _run(
    parse: Callable[[T], object], value: T, loops: int, refusals: tuple[type[Exception], ...]
) -> float:
    start = time.thread_time()
    for _ in range(loops):
        with contextlib.suppress(*refusals):  # a refusal is a fine answer, if quick
            parse(value)
    return time.thread_time() - start


def growth(
    parse: Callable[[T], object],
    small: T,
    large: T,
    refusals: tuple[type[Exception], ...] = (ValueError,),
) -> float:
    """How many times longer `parse(large)` takes than `parse(small)`, the best of a few runs.

    The two are timed in turns, so that both see the same machine (another
    process on the same cores slows both); the fastest of each counts. More
    turns are taken only while the growth is in doubt: a linear parser takes
    `MIN_ATTEMPTS`, one far too slow no more either.
    """
    loops = 1
    while _run(parse, small, loops, refusals) < MIN_RUN and loops < 1 << 20:
        loops *= 2
    fastest_small = fastest_large = float("inf")
    for attempt in range(1, ATTEMPTS + 1):
        fastest_small = min(fastest_small, _run(parse, small, loops, refusals))
        fastest_large = min(fastest_large, _run(parse, large, loops, refusals))
        ratio = fastest_large / fastest_small
        if attempt >= MIN_ATTEMPTS and (ratio < MAX_RATIO or ratio > 3 * MAX_RATIO):
            break
    return ratio


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
