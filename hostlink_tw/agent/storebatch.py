"""
Group commit for the task store (:mod:`hostlink_tw.agent.store`): items
added while the store's thread is busy are written by one call, in one
transaction -- one fsync for all of them.

A commit takes milliseconds (``synchronous=FULL``), a task writes a chunk of
output in microseconds: without groups, a task's output rate would be one
chunk per fsync.  Each item's Deferred still fires only once the write that
holds it returned, so an item is durable before anyone acts on it.

A group takes only the items added before the store's next other call
(:meth:`GroupCommit.close`), so every call still runs in the order it was
made.  A write that fails fails every item of its group.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["GroupCommit"]

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class _Group(Generic[_Item, _Result]):
    """Items waiting for one write (filled on the reactor thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[_Item, Deferred[_Result]]] = []
        #: Set by the store's thread when it takes the items: later ones need a new group.
        self.taken = False

    def take(self) -> list[tuple[_Item, Deferred[_Result]]]:
        with self.lock:
            self.taken = True
            return list(self.items)

    def join(self, item: _Item, d: Deferred[_Result]) -> bool:
        """Add the item unless the thread has taken the group already."""
        with self.lock:
            if self.taken:
                return False
            self.items.append((item, d))
            return True


class GroupCommit(Generic[_Item, _Result]):
    """
    :param submit: runs a function on the store's one thread; a Deferred of its result.
    :param write: writes several items in one transaction (on that thread) and
        returns one result per item, in order; raises to fail them all.
    """

    def __init__(
        self,
        submit: Callable[[Callable[[], Any]], Deferred[Any]],
        write: Callable[[list[_Item]], list[_Result]],
    ) -> None:
        self._submit = submit
        self._write = write
        self._group: _Group[_Item, _Result] | None = None

    def close(self) -> None:
        """Another store call is being made: items added from now on go in a new group."""
        self._group = None

    def add(self, item: _Item) -> Deferred[_Result]:
        """Write ``item`` with the others of its group; fire with its result."""
        d: Deferred[_Result] = Deferred()
        group = self._group
        if group is not None and group.join(item, d):
            return d
        group = self._group = _Group()
        group.join(item, d)
        self._submit(lambda: self._run(group)).addCallbacks(self._fire, self._lost(group))
        return d

    def _run(self, group: _Group[_Item, _Result]) -> tuple[
        list[Deferred[_Result]], list[_Result] | Exception
    ]:
        """On the store's thread: take the group and write it."""
        items = group.take()
        waiting = [d for _, d in items]
        try:
            return waiting, self._write([item for item, _ in items])
        except Exception as e:  # noqa: BLE001 - handed to every item's Deferred
            return waiting, e

    @staticmethod
    def _fire(outcome: tuple[list[Deferred[_Result]], list[_Result] | Exception]) -> None:
        waiting, results = outcome
        if isinstance(results, Exception):
            for d in waiting:
                d.errback(results)
            return
        for d, result in zip(waiting, results, strict=True):
            d.callback(result)

    @staticmethod
    def _lost(group: _Group[_Item, _Result]) -> Callable[[Failure], None]:
        def lost(failure: Failure) -> None:
            # The thread could not run the write at all: fail what still waits.
            for _, d in group.items:
                if not d.called:
                    d.errback(failure)

        return lost
