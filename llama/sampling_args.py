"""The sampling settings every generation entry point takes, checked in one place.

Kept apart from llama.generation (no torch import) so that command-line scripts can refuse a bad
--temperature before any weight is read.
"""

import math
import numbers
from typing import Callable, Optional


def check_sampling_args(temperature: float, top_p: float, max_gen_len: Optional[int]) -> None:
    """Refuse sampling settings that torch would fail on deep inside, or silently misread.

    temperature: a finite number >= 0 (0 means greedy); top_p: a number in (0, 1]; max_gen_len:
    an integer >= 0, or None (the caller's default). Raises TypeError for a value of the wrong
    type (a string, a bool), ValueError for one out of range (NaN and infinity included).
    """
    _check_number("temperature", temperature, ">= 0 (0 means greedy)", lambda v: v >= 0)
    _check_number("top_p", top_p, "in (0, 1]", lambda v: 0 < v <= 1)
    if max_gen_len is None:
        return
    if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, numbers.Integral):
        raise TypeError(f"max_gen_len must be an integer >= 0 (a number of tokens), got {max_gen_len!r} ({type(max_gen_len).__name__})")
    if max_gen_len < 0:
        raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len}")


def _check_number(name: str, value: object, expected: str, in_range: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number {expected}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")
    if not in_range(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
