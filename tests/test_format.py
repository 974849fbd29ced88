"""People-facing formatting: rich tables in plain text when stdout is not a terminal, hardware
descriptions cut at a word, a missing peak shown as "-"."""

import json

from planner.format import peak, shorten, table


def test_plain_table_is_one_line_per_row_with_a_rule_under_the_header():
    long_cell = "x" * 300
    text = table(["name", "value", "note"], [["a", 1.5, "[bold]not markup[/bold]"], ["bb", 12, long_cell]])
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].startswith("name") and set(lines[1]) == {"-"}
    assert lines[2].startswith("a ") and lines[3].startswith("bb ")
    assert "[bold]not markup[/bold]" in lines[2] and lines[3].endswith(long_cell)  # never interpreted, never cut
    assert lines[2].index("1.5") + 3 == lines[3].index("12") + 2  # numbers right-aligned
    assert all(line == line.rstrip() for line in lines) and "\x1b" not in text


def test_shorten_cuts_at_a_word_and_peak_dashes_a_missing_value():
    text = "NVIDIA Tesla V100 SXM2 32GB HBM2 (no bf16) in a DGX-1: NVLink2 300 GB/s"
    cut = shorten(text, 30)
    assert len(cut) <= 30 and cut.endswith(" …") and text.startswith(cut[:-2]) and text[len(cut) - 2] == " "
    assert shorten("short", 30) == "short"
    assert peak(None) == peak(0) == "-" and peak(312e12) == "312.0"


def test_hardware_listing(cli):
    rows = json.loads(cli("hardware", "--json", check=True).stdout)
    text = cli("hardware", check=True).stdout
    lines = {line.split()[0]: line for line in text.splitlines() if line and not line.startswith(("-", "name"))}
    for r in rows:
        line = lines[r["name"]]
        words = line.split()
        if not r["peak_flops"].get("bf16"):
            assert words[3] == "-", line  # name chip memory bf16 ...
        description = line[line.index(r["description"].split()[0], len(r["name"]) + 1):]
        if description.endswith(" …"):
            kept = description[:-2]
            assert r["description"].startswith(kept) and r["description"][len(kept)] == " ", description
        else:
            assert description == r["description"]
    assert any(not r["peak_flops"].get("bf16") for r in rows)  # v100: the case the listing showed as "0.0"
