"""
Each task's verdict (:func:`judge`), the rows of the chaos-with-tasks table
(:mod:`evidence.chaos_tasks`) and the table itself, as plain text for the
terminal and as an RST simple table for ``docs/chaos.rst``.  The columns
are defined in :mod:`evidence.chaos_tasks`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evidence.taskfaults import StoredTask, TaskBook, WireLog
from tests import taskgen

__all__ = ["HEADER", "TaskRow", "TaskVerdict", "format_rst", "format_table", "judge"]

_REPLACEMENT = "\ufffd".encode()

@dataclass
class TaskVerdict:
    """One task's outcome, against the columns of :mod:`evidence.chaos_tasks`."""

    name: str
    interrupted_by_fault: bool
    ran_once: bool = False
    delivered_once: bool = False
    output_complete: bool = False
    interrupted_ok: bool = False
    resent_finals: int = 0
    resent_outputs: int = 0
    problems: list[str] = field(default_factory=list)


def judge(book: TaskBook, stored: StoredTask | None, wire: WireLog, name: str,
          interrupted_by_fault: bool) -> TaskVerdict:
    """The verdict on task ``name`` (see :mod:`evidence.chaos_tasks` for each column)."""
    v = TaskVerdict(name, interrupted_by_fault)
    spec = book.specs[name]
    runs, done = book.runs(name), book.done(name)
    if stored is None:
        v.problems.append("the control plane has no such task")
        return v
    received = wire.finals(stored.attempt_id)
    ids = {m.message_id for m in received}
    v.resent_finals = max(0, len(received) - len(ids))
    v.resent_outputs = wire.resent_outputs(stored.attempt_id)
    conflicting = {(m.message_id, m.status, m.exit_code) for m in received}
    one_final = (
        stored.attempts == 1 and len(stored.finals) == 1 and len(conflicting) <= 1
        and (not received or received[0].message_id == stored.finals[0][0])
    )
    if not one_final:
        v.problems.append(
            f"attempts {stored.attempts}, finals stored {len(stored.finals)}, "
            f"distinct finals received {sorted(conflicting, key=str)}"
        )
    final = stored.finals[0][1] if stored.finals else {}
    if interrupted_by_fault and done is None:
        v.interrupted_ok = (
            one_final and len(runs) <= 1 and stored.status == "interrupted"
            and final.get("status") == "interrupted" and final.get("exit_code") == -1
        )
        expected = taskgen.stream_bytes(spec.nbytes, spec.seed)
        # A task killed mid-character leaves a split character at the end of its
        # stream, which the agent sends as U+FFFD (one per byte, as Go does).
        kept, replaced = stored.stdout, 0
        while kept.endswith(_REPLACEMENT) and replaced < 3:
            kept, replaced = kept[: -len(_REPLACEMENT)], replaced + 1
        if not expected.startswith(kept):
            v.interrupted_ok = False
            v.problems.append("stored stdout of the interrupted task is not a prefix of its output")
        if not v.interrupted_ok:
            v.problems.append(f"interrupted task: runs {len(runs)}, status {stored.status}, "
                              f"final {final.get('status')}/{final.get('exit_code')}")
        return v
    v.interrupted_by_fault = False  # it finished by itself: judged as any other
    v.ran_once = len(runs) == 1
    if not v.ran_once:
        v.problems.append(f"ran {len(runs)} times")
    want = None
    if done is not None:
        want = ("completed" if done["exit"] == 0 else "failed", done["exit"])
    got = (final.get("status"), final.get("exit_code"))
    v.delivered_once = one_final and want is not None and got == want and (
        (stored.status, stored.exit_code) == want)
    if not v.delivered_once:
        v.problems.append(f"final {got}, task {stored.status}/{stored.exit_code}, "
                          f"its files say {want}")
    v.output_complete = (
        done is not None and not stored.truncated
        and taskgen.digest(stored.stdout) == done["stdout"]
        and taskgen.digest(stored.stderr) == done["stderr"]
    )
    if not v.output_complete:
        v.problems.append(
            f"output: stored {len(stored.stdout)}+{len(stored.stderr)} bytes, printed "
            f"{(done or {}).get('stdout_bytes')}+{(done or {}).get('stderr_bytes')}, "
            f"truncated flag {stored.truncated}"
        )
    return v



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
