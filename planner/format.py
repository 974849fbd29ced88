"""Formatting for people: units at the edges only (STYLE.md lesson 7)."""

from __future__ import annotations

from collections.abc import Sequence

GIB = 2**30


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f}"


def count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A plain fixed-width table; `align` has one 'l' or 'r' per column (default: numbers right)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if align is None:
        align = "".join("r" if rows and _numeric(rows[0][i]) else "l" for i in range(len(headers)))

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _numeric(value: object) -> bool:
    if isinstance(value, (int, float)):
        return True
    text = str(value).replace(",", "").replace("%", "").replace("+", "").replace("-", "")
    try:
        float(text)
        return True
    except ValueError:
        return False
