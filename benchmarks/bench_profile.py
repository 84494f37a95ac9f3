"""
Where a reconnect's CPU goes: a cProfile of one storm (run 1 of a fleet)
summed by owner — our package, Twisted, Autobahn, RSA signing, and the
``pprint.pformat`` calls Autobahn makes for debug log lines that are then
filtered out.
"""

from __future__ import annotations

import pstats
import re
from typing import Any

from benchmarks.bench_support import REPO

__all__ = ["breakdown", "top_functions"]

# ".../lib/python3.11/pprint.py" → "pprint.py"
_STDLIB = re.compile(r"^.*/lib/python3\.\d+/")


def _owner(filename: str, name: str) -> str:
    if filename == "~":
        if "poll" in name:
            return "waiting in epoll (idle)"
        if "sign" in name and "RSAPrivateKey" in name:
            return "RSA-PSS signing (cryptography)"
        if "socket" in name:
            return "socket system calls"
        return "other built-ins"
    if "/hostlink_tw/" in filename:
        return "hostlink_tw"
    if filename.endswith("pprint.py"):
        return "Autobahn debug-log arguments (pprint.pformat)"
    if "/autobahn/" in filename:
        return "Autobahn"
    if "/twisted/logger/" in filename:
        return "twisted.logger"
    if "/twisted/" in filename:
        return "Twisted"
    if "/txaio/" in filename:
        return "txaio"
    if "/cryptography/" in filename:
        return "RSA-PSS signing (cryptography)"
    return "other Python"


def breakdown(path: str) -> list[tuple[str, float]]:
    """
    Own time (tottime) per owner, largest first.  Built-ins called from
    ``pprint`` (``repr``, ``sorted``…) are charged to it, as their caller.
    """
    stats = pstats.Stats(path)
    totals: dict[str, float] = {}
    raw: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, name), (_cc, _nc, own, _cum, callers) in raw.items():
        owner = _owner(filename, name)
        if owner == "other built-ins" and callers:
            # Split a built-in's time among its callers' owners.
            total_calls = sum(c[1] for c in callers.values()) or 1
            for (cfile, _cl, cname), caller_stats in callers.items():
                share = own * caller_stats[1] / total_calls
                key = _owner(cfile, cname)
                totals[key] = totals.get(key, 0.0) + share
            continue
        totals[owner] = totals.get(owner, 0.0) + own
    return sorted(totals.items(), key=lambda kv: kv[1], reverse=True)


def top_functions(path: str, count: int = 12) -> list[tuple[str, int, float, float]]:
    """The ``count`` functions with the most own time: (where, calls, own s, cumulative s)."""
    stats = pstats.Stats(path)
    raw: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, name), (_cc, calls, own, cum, _callers) in raw.items():
        short = filename.split("site-packages/")[-1].replace(f"{REPO}/", "")
        short = _STDLIB.sub("", short)
        rows.append((f"{short}:{line}({name})" if filename != "~" else name, calls, own, cum))
    rows.sort(key=lambda r: r[2], reverse=True)
    return rows[:count]
