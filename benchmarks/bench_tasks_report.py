"""
Phase 2's part of ``performance.rst``: what every task benchmark returns
(:class:`TaskBenchResult`) and the "Phase 2: tasks" section built from them
(:func:`render_tasks`).

A phase-2 benchmark module measures, then returns one object that satisfies
:class:`TaskBenchResult` (a dataclass with properties is the usual shape).
``benchmarks/run.py`` collects them in ``Results.tasks``, in the order they
ran; the report prints one summary table of all of them and one subsection
each, and ``--json`` writes each one's :meth:`~TaskBenchResult.to_dict`.
A benchmark that could not run returns a :class:`NotMeasured` instead, so
its target still shows, with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from benchmarks.bench_rst import section, table, verdict

__all__ = [
    "SUMMARY_HEADER",
    "NotMeasured",
    "TaskBenchResult",
    "render_tasks",
    "tasks_to_dict",
]

#: The columns of :meth:`TaskBenchResult.summary_row`.
SUMMARY_HEADER = ["benchmark", "measured", "target", "ratio / margin", "verdict"]


@runtime_checkable
class TaskBenchResult(Protocol):
    """
    The result of one phase-2 benchmark.  ``title`` and ``met`` may be
    plain attributes or properties.
    """

    @property
    def title(self) -> str:
        """The benchmark's name, e.g. ``"Task round trip"`` (its subsection heading)."""

    @property
    def met(self) -> bool | None:
        """Whether the target is met; None when it was not measured."""

    def summary_row(self) -> list[str]:
        """One row under :data:`SUMMARY_HEADER`: benchmark, measured, target,
        ratio/margin, verdict (use :func:`benchmarks.bench_rst.verdict`)."""

    def detail_rst(self) -> str:
        """The subsection's body (no heading): method, figures, verdict; ends with a blank line."""

    def to_dict(self) -> dict[str, Any]:
        """Raw figures for ``--json`` (JSON-able; derived values and ``met`` included)."""


@dataclass(frozen=True)
class NotMeasured:
    """A benchmark that did not run (skipped, or the machine cannot run it), and why."""

    title: str
    target: str
    reason: str

    @property
    def met(self) -> bool | None:
        """Never measured."""
        return None

    def summary_row(self) -> list[str]:
        """The target, with nothing measured."""
        return [self.title, "—", self.target, "—", verdict(None)]

    def detail_rst(self) -> str:
        """The reason it did not run."""
        return f"Not measured: {self.reason}\n\n"

    def to_dict(self) -> dict[str, Any]:
        """The reason, for ``--json``."""
        return {"title": self.title, "target": self.target, "reason": self.reason, "met": None}


def render_tasks(results: Sequence[TaskBenchResult], *, char: str = "-", sub: str = "~") -> str:
    """
    The "Phase 2: tasks" part of ``performance.rst``: a summary table of
    every result, then one subsection per result, titled by its ``title``.

    :param char: the underline of the part's heading (a section of the document).
    :param sub: the underline of each benchmark's subsection.
    """
    out = [section("Phase 2: tasks", char)]
    if not results:
        return "".join(out) + "Not run.\n\n"
    out.append(
        "A real agent process (``twistd -n hostlink`` with task delivery and results "
        "on, its local store on this machine's disk) against the reference control "
        "plane, on 127.0.0.1.  Each benchmark below says what it times and what it "
        "is compared with.\n\n"
    )
    out.append(table(SUMMARY_HEADER, [r.summary_row() for r in results]) + "\n\n")
    for r in results:
        out.append(section(r.title, sub))
        out.append(r.detail_rst())
    return "".join(out)


def tasks_to_dict(results: Sequence[TaskBenchResult]) -> list[dict[str, Any]]:
    """Every result's :meth:`~TaskBenchResult.to_dict`, with its title."""
    return [{"title": r.title, **r.to_dict()} for r in results]
