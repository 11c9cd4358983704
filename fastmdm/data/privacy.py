"""The codec's one privacy rule: a value is stored in a model file, and emitted as itself,
only when at least `MIN_ROWS_PER_VALUE` training rows hold it.

A value held by k or more rows identifies none of them (the k-anonymity argument: a
synthetic row that repeats it could have come from any of k people), while a value held by
one row (a job title held by one person, an income of 173,412) points at that row. The rule
is applied per column, to categories and to numbers alike; rarer values are generalised
(a shared token for categories, a value drawn between neighbouring levels for numbers) and
never written down.
"""
from __future__ import annotations

__all__ = ["MIN_ROWS_PER_VALUE"]

#: Fewest training rows that must hold a value before the codec stores it or emits it verbatim.
MIN_ROWS_PER_VALUE = 5
