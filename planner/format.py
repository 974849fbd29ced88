"""Formatting for people: units at the edges only (STYLE.md lesson 7)."""

from __future__ import annotations

import io
import shutil
import sys
import textwrap
from collections.abc import Sequence

GIB = 2**30
PLAIN_WIDTH = 100_000  # characters a table may take when stdout is not a terminal: a row is one line, never cut


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


def shorten(text: str, width: int) -> str:
    """`text` cut at a word boundary to at most `width` characters, with an ellipsis when cut."""
    return textwrap.shorten(text, width=width, placeholder=" …", break_on_hyphens=False)


def peak(flops: float | None) -> str:
    """A peak in TFLOP/s, "-" when the device has none for that precision (missing or zero)."""
    return f"{flops / 1e12:.1f}" if flops else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A table drawn by rich; `align` has one 'l' or 'r' per column (default: numbers right). On a
    terminal it fits the terminal's width (long cells wrap), with a bold header; otherwise (pipes,
    files, tests) plain ASCII at its natural width: one line per row, the first column starting each
    line, the same whatever the terminal."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    tty = sys.stdout.isatty()
    if align is None:
        align = "".join("r" if rows and _numeric(rows[0][i]) else "l" for i in range(len(headers)))
    grid = Table(box=box.SIMPLE_HEAD if tty else _plain_box(), show_edge=False, pad_edge=False, collapse_padding=True,
                 header_style="bold" if tty else "", padding=(0, 1))
    for i, (header, side) in enumerate(zip(headers, align)):
        grid.add_column(Text(header), justify="right" if side == "r" else "left", no_wrap=i == 0)
    for row in rows:
        grid.add_row(*(Text(str(c)) for c in row))
    width = shutil.get_terminal_size().columns if tty else PLAIN_WIDTH
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=tty, color_system="auto" if tty else None, highlight=False,
            soft_wrap=False).print(grid)
    return "\n".join(line.rstrip() for line in out.getvalue().rstrip("\n").split("\n"))


def _plain_box() -> object:
    from rich.box import Box

    # rich.box.SIMPLE_HEAD in ASCII: no edges, a dashed line under the header
    return Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)


def _numeric(value: object) -> bool:
    if isinstance(value, (int, float)):
        return True
    text = str(value).replace(",", "").replace("%", "").replace("+", "").replace("-", "")
    try:
        float(text)
        return True
    except ValueError:
        return False


def uncalibrated_note(missing: list[str] | None) -> str | None:
    """The flag on tables whose chip or framework no measured run of the profile calibrated."""
    if not missing:
        return None
    return (f"uncalibrated: intervals widened (no measured runs of {' or '.join(missing)} in the calibration "
            "profile; they take the spread across chips and frameworks)")
