"""Hypothesis settings shared by the fuzz tests: a few seconds in the default run, longer under ``slow``.

``fuzz_tests(strategy, prop)`` returns two tests of one property: a derandomised short one (same inputs
every run, so failures reproduce) and a random long one marked ``slow`` (``pytest -m slow``).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FAST = settings(max_examples=60, derandomize=True, database=None, **_COMMON)
LONG = settings(max_examples=3000, **_COMMON)


def fuzz_tests(strategy, prop):
    """(default-run test, slow test) of ``prop(value)`` over ``strategy``."""
    fast = FAST(given(strategy)(prop))
    long = pytest.mark.slow(LONG(given(strategy)(prop)))
    return fast, long


# Any JSON value, including deep nesting, huge numbers, odd strings (lone surrogates excluded: not UTF-8).
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def nested(depth: int) -> str:
    """A JSON list nested ``depth`` levels deep."""
    return "[" * depth + "]" * depth


def dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()
