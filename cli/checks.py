"""The one check of every numeric flag of every `vita-audio` command: argparse `type=` factories.

Each factory returns a converter that parses the flag's text and checks it is finite and in range, so a bad
value is refused by argparse itself — one line naming the flag, exit 2 — before any file is read, any model
loads or Ray starts:

    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--top-p", type=real(above=0, high=1), default=1.0)
    p.add_argument("--gpus-per-stage", type=gpus, default=None)

Resource amounts follow what a Ray cluster can grant at all: finite, >= 0, no finer than 0.0001, and a GPU
count above 1 must be whole (a request for 1.5 GPUs waits forever); a local Ray (`--num-cpus`) needs at
least one CPU. Torch- and Ray-free.
"""
from __future__ import annotations

import argparse
import math

RESOURCE_UNIT = 1e-4  # Ray's resource precision: a non-zero amount below it is rounded to nothing
SEED_MAX = 2**32 - 1  # numpy's and most generators' seed range


def _fail(expected: str, text) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"must be {expected}, got {str(text)!r}")


def _bounds(low, high, above, below) -> str:
    show = lambda v: str(v) if isinstance(v, int) else f"{v:g}"  # noqa: E731
    parts = []
    if above is not None:
        parts.append(f"> {show(above)}")
    elif low is not None:
        parts.append(f">= {show(low)}")
    if below is not None:
        parts.append(f"< {show(below)}")
    elif high is not None:
        parts.append(f"<= {show(high)}")
    return " and ".join(parts)


def _in_range(value, low, high, above, below) -> bool:
    return ((low is None or value >= low) and (high is None or value <= high)
            and (above is None or value > above) and (below is None or value < below))


def integer(low: int | None = None, high: int | None = None):
    """An integer flag in [low, high] (either end open when None)."""
    bounds = _bounds(low, high, None, None)

    def convert(text):
        try:
            value = int(str(text).strip())
        except ValueError:
            raise _fail("an integer" + (f" {bounds}" if bounds else ""), text) from None
        if not _in_range(value, low, high, None, None):
            raise _fail(bounds, text)
        return value

    convert.__name__ = "integer"
    return convert


def _finite(text) -> float | None:
    """The flag's text as a finite float, else None (not a number, NaN, an infinity)."""
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def real(low: float | None = None, high: float | None = None, *, above: float | None = None,
         below: float | None = None):
    """A finite number flag: >= low (or > above), <= high (or < below); NaN and infinities are refused."""
    bounds = _bounds(low, high, above, below)

    def convert(text):
        value = _finite(text)
        if value is None:
            raise _fail("a finite number" + (f" {bounds}" if bounds else ""), text)
        if not _in_range(value, low, high, above, below):
            raise _fail(bounds, text)
        return value

    convert.__name__ = "number"
    return convert


def resource(kind: str, *, allow_zero: bool = True):
    """An amount of a Ray resource per actor/worker/stage ("GPU" or "CPU") that some cluster can grant."""
    floor = ">= 0" if allow_zero else "> 0"

    def convert(text):
        value = _finite(text)
        if value is None:
            raise _fail(f"a finite number of {kind}s {floor}", text)
        if value < 0 or (value == 0 and not allow_zero):
            raise _fail(floor, text)
        if 0 < value < RESOURCE_UNIT:
            raise _fail(f"0 or at least {RESOURCE_UNIT:g} {kind}s (Ray's precision)", text)
        if kind == "GPU" and value > 1 and not value.is_integer():
            raise _fail("a fraction of one GPU (<= 1) or a whole number of GPUs (a share of more than one GPU "
                        "cannot be granted)", text)
        return value

    convert.__name__ = f"{kind.lower()}s"
    return convert


positive_int = integer(1)
non_negative_int = integer(0)
positive_float = real(above=0)
non_negative_float = real(0)
probability = real(above=0, high=1)  # top-p
seed = integer(0, SEED_MAX)
port = integer(1, 65535)
gpus = resource("GPU")  # per stage / actor / worker: 0 (CPU), a fraction of one card, or whole cards
cpus = resource("CPU")  # per actor: Ray's logical CPUs (0: the actor holds none while it runs)
positive_cpus = resource("CPU", allow_zero=False)
local_gpus = integer(0)  # GPUs a local Ray declares (logical ones work without CUDA)
local_cpus = integer(1)  # CPUs a local Ray declares: with none, no actor or task is ever placed
