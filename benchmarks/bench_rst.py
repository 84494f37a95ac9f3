"""
The reStructuredText pieces every benchmark report is built from: a simple
table, a section heading, a verdict.  Phase 1's report
(:mod:`benchmarks.bench_report`) and phase 2's
(:mod:`benchmarks.bench_tasks_report`) share them so the two parts of
``performance.rst`` look alike.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["NOT_JUDGED", "section", "table", "verdict"]


#: The verdict of a figure measured at a smaller size than its target's.
NOT_JUDGED = "not judged"


def verdict(met: bool | None, unjudged: str = "not run") -> str:
    """``**met**``, ``**missed**``, or ``unjudged`` when there is no verdict
    (``not run``; a smaller run than the target's says ``not judged``)."""
    if met is None:
        return unjudged
    return "**met**" if met else "**missed**"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An RST grid-free "simple table"."""
    cols = len(header)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(cols)]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)), rule]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    lines.append(rule)
    return "\n".join(lines)


def section(title: str, char: str = "-") -> str:
    """A heading underlined with ``char``, and its newline."""
    return f"{title}\n{char * len(title)}\n"
