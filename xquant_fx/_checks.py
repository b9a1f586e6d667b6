"""Argument checks shared by the public entry points (``optimize``, the memory planner).

Plain Python, importing nothing of the package, so any module can use it without an import cycle.
"""

from __future__ import annotations


def positive_int(name: str, value, *, optional: bool = False) -> int | None:
    """``value`` when it is an int of at least 1 (a bool is not), or ``None`` when ``optional``
    and ``value`` is ``None``; otherwise ``ValueError`` naming ``name`` and ``value``."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")
    return value
