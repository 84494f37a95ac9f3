"""
The rows of the chaos-with-tasks table (:mod:`evidence.chaos_tasks`) and the
table itself, as plain text for the terminal and as an RST simple table
for ``docs/chaos.rst``.  The columns are defined in
:mod:`evidence.chaos_tasks`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evidence.taskfaults import TaskVerdict

__all__ = ["HEADER", "TaskRow", "format_rst", "format_table"]

HEADER = ("fault", "submitted", "ran once", "delivered once", "output complete",
          "interrupted", "resent", "recovery", "max RSS", "verdict")


@dataclass
class TaskRow:
    """What one fault did to the tasks."""

    fault: str
    submitted: int = 0
    judged: int = 0
    ran_once: int = 0
    delivered_once: int = 0
    output_complete: int = 0
    interrupted: int = 0
    interrupted_ok: int = 0
    resent_finals: int = 0
    resent_outputs: int = 0
    recovered: float | None = None
    max_rss: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def fill(self, verdicts: list[TaskVerdict], max_rss: int) -> None:
        """Count the tasks' verdicts; every task's problem becomes the row's."""
        self.submitted = len(verdicts)
        self.max_rss = max_rss
        for v in verdicts:
            self.resent_finals += v.resent_finals
            self.resent_outputs += v.resent_outputs
            if v.interrupted_by_fault:
                self.interrupted += 1
                self.interrupted_ok += v.interrupted_ok
            else:
                self.judged += 1
                self.ran_once += v.ran_once
                self.delivered_once += v.delivered_once
                self.output_complete += v.output_complete
            self.problems += [f"{v.name}: {p}" for p in v.problems]

    @property
    def ok(self) -> bool:
        """On target: 100 % in the three columns, every interrupted task ok, no problem."""
        return (
            not self.problems and self.submitted > 0
            and self.ran_once == self.delivered_once == self.output_complete == self.judged
            and self.interrupted_ok == self.interrupted
        )

    def cells(self) -> tuple[str, ...]:
        def share(n: int) -> str:
            return f"{100 * n / self.judged:.0f} %" if self.judged else "—"

        return (
            self.fault,
            str(self.submitted),
            share(self.ran_once),
            share(self.delivered_once),
            share(self.output_complete),
            f"{self.interrupted_ok}/{self.interrupted}" if self.interrupted else "—",
            f"{self.resent_finals}/{self.resent_outputs}",
            "—" if self.recovered is None else f"{self.recovered:.2f}s",
            f"{self.max_rss / (1 << 20):.0f} MiB" if self.max_rss else "—",
            "ok" if self.ok else "FAIL",
        )

    def describe(self) -> str:
        """Problems and notes, for a failure message."""
        lines = [f"{self.fault}: {'ok' if self.ok else 'FAILED'}"]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def format_table(rows: list[TaskRow]) -> str:
    """The table as aligned text."""
    cells = [HEADER, *(r.cells() for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                         for i, c in enumerate(row))

    return "\n".join([line(HEADER), "  ".join("-" * w for w in widths),
                      *(line(r.cells()) for r in rows[:])])


def format_rst(rows: list[TaskRow]) -> str:
    """The table as an RST simple table (readable as it is, rendered as a table)."""
    cells = [HEADER, *(r.cells() for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    rule = "  ".join("=" * w for w in widths)

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip()

    return "\n".join([rule, line(HEADER), rule, *(line(r.cells()) for r in rows), rule]) + "\n"
