"""The store operations of tests/test_agent_store_crash.py, and the process that dies doing them.

Imported, this module gives the test a deterministic stream of store calls
for a seed (:class:`Script`) and the model of what the first *n* of them leave
in the file (:meth:`Model.snapshot`), so that after a crash the test can say
exactly which states the file may be in.

Run as a script it is a small fork server: it imports the store once (Twisted
makes that the slow part of starting Python), then, for each command line on
stdin, forks a child that opens the store file with
:class:`hostlink_tw.agent.store.Database` and dies as told.  Every line it
writes goes to stdout:

* ``pid P`` first, from the child;
* ``committed N`` once the N-th call of the script has returned (its commit
  is durable: the store runs ``synchronous=FULL``);
* ``dying`` just before the child calls ``os._exit(0)`` in the middle of its
  work, ``finished`` if it ran out of work instead;
* ``end S`` from the server once the child is gone, S its exit code as
  ``subprocess`` reports it (``-9`` for SIGKILL).

Commands: ``run PATH SEED exit K WHEN`` dies before (``WHEN`` = ``before``)
or just after (``after``) the K-th SQL statement of the script;
``run PATH SEED final J`` dies between the ``UPDATE`` that ends an attempt and
the ``INSERT`` of its final, in the J-th final written; ``run PATH SEED loop``
runs the script without end until the test kills it; ``recover PATH J`` calls
``recover`` once and dies before the INSERT of its J-th interrupted final
(``J`` = 0: after the commit, before saying ``recovered``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

# The store's own constants and id rule, so the model cannot drift from them.
from hostlink_tw.agent.store import FINAL, OUTPUT, Database, interrupted_message_id

Key = tuple[str, str]
Op = tuple[str, tuple[Any, ...]]

# Far beyond any time the script uses.
RECOVER_AT = 1e9

_INTERRUPTED = {
    "status": "interrupted",
    "exit_code": -1,
    "output_truncated": False,
    "error_truncated": False,
}


def _text(payload: dict[str, Any]) -> str:
    # As the store serializes payloads.
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


class Model:
    """What the store holds after some calls: the rows of both tables."""

    def __init__(self) -> None:
        # key -> [state, received_at, started_at, ended_at]
        self.executions: dict[Key, list[Any]] = {}
        # message_id -> [task, attempt, type, stream, sequence, payload, bytes, created, acked]
        self.outbox: dict[str, list[Any]] = {}
        self.order: list[Key] = []  # insertion order (the store's rowid order)

    def apply(self, name: str, args: tuple[Any, ...]) -> None:
        """The effect of ``Database.<name>(*args)`` on the rows."""
        getattr(self, "_" + name)(*args)

    def _record_received(self, task: str, attempt: str, now: float) -> None:
        if (task, attempt) not in self.executions:
            self.executions[(task, attempt)] = ["received", now, None, None]
            self.order.append((task, attempt))

    def _mark_running(self, task: str, attempt: str, now: float) -> None:
        row = self.executions.get((task, attempt))
        if row is not None and row[0] == "received":
            row[0], row[2] = "running", now

    def _end(self, key: Key, message_id: str, payload: dict[str, Any], now: float) -> None:
        row = self.executions[key]
        row[0], row[3] = "ended", now
        text = _text(payload)
        self.outbox[message_id] = [
            key[0], key[1], FINAL, None, None, text, len(text.encode("utf-8")), now, 0
        ]

    def _record_final(
        self, task: str, attempt: str, message_id: str, payload: dict[str, Any], now: float
    ) -> None:
        if self.executions[(task, attempt)][0] != "ended":
            self._end((task, attempt), message_id, payload, now)

    def _enqueue_output(
        self, task: str, attempt: str, message_id: str, stream: str, sequence: int,
        payload: dict[str, Any], byte_count: int, now: float,
    ) -> None:
        self.outbox[message_id] = [
            task, attempt, OUTPUT, stream, sequence, _text(payload), byte_count, now, 0
        ]

    def _ack(self, message_id: str) -> None:
        row = self.outbox.get(message_id)
        if row is None:
            return
        if row[2] == OUTPUT:
            del self.outbox[message_id]
        else:
            row[8] = 1

    def _ack_through(self, task: str, attempt: str, stream: str, sequence: int) -> None:
        for message_id, row in list(self.outbox.items()):
            if row[2] == OUTPUT and row[:2] == [task, attempt] and row[3] == stream \
                    and row[4] <= sequence:
                del self.outbox[message_id]

    def running(self) -> list[Key]:
        """Running attempts in the order ``recover`` ends them (by start time)."""
        running = [key for key in self.order if self.executions[key][0] == "running"]
        return sorted(running, key=lambda key: self.executions[key][2])

    def queued(self) -> list[Key]:
        """Received, not started attempts, oldest first."""
        return [key for key in self.order if self.executions[key][0] == "received"]

    def recover(self, now: float) -> None:
        """The effect of ``Database.recover(now)``."""
        for key in self.running():
            self._end(key, interrupted_message_id(*key), _INTERRUPTED, now)

    def snapshot(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Both tables as sorted rows, as :func:`snapshot` reads them from a file."""
        executions = sorted(
            (key[0], key[1], *row) for key, row in self.executions.items()
        )
        outbox = sorted((message_id, *row) for message_id, row in self.outbox.items())
        return executions, outbox


def snapshot(conn: Any) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Both tables of an open sqlite3 connection, in :meth:`Model.snapshot`'s form."""
    executions = sorted(conn.execute(
        "SELECT task_id, attempt_id, state, received_at, started_at, ended_at FROM executions"
    ))
    outbox = sorted(conn.execute(
        "SELECT message_id, task_id, attempt_id, type, stream, sequence, payload, byte_count,"
        " created_at, acked FROM outbox"
    ))
    return executions, outbox


class Script:
    """The calls of one seed, chosen among those valid in the model's state.

    :meth:`step` picks the next call, applies it to :attr:`model` and returns
    it; the same seed always gives the same calls.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._random = random.Random(seed)
        self.model = Model()
        self.count = 0
        self._next_sequence: dict[tuple[Key, str], int] = {}

    def _choose(self) -> Op:
        rng, model, now = self._random, self.model, float(self.count + 1)
        states: dict[str, list[Key]] = {"received": [], "running": [], "ended": []}
        for key in model.order:
            states[model.executions[key][0]].append(key)
        unacked = sorted(m for m, row in model.outbox.items() if not row[8])
        streams = sorted({(k, s) for (k, s), n in self._next_sequence.items() if n > 1})
        choices: list[tuple[int, Callable[[], Op]]] = [
            (3, lambda: self._new_attempt(now)),
            (1 if model.order else 0, lambda: (
                "record_received", (*rng.choice(model.order), now))),
            (4 if states["received"] else 0, lambda: (
                "mark_running", (*rng.choice(states["received"]), now))),
            (8 if states["running"] else 0, lambda: self._output(rng.choice(states["running"]))),
            (3 if states["running"] else 0, lambda: self._final(rng.choice(states["running"]))),
            # An attempt ended before it ran (the runner gave up on it).
            (1 if states["received"] else 0, lambda: self._final(
                rng.choice(states["received"]))),
            (1 if states["ended"] else 0, lambda: self._final(rng.choice(states["ended"]))),
            (4 if unacked else 0, lambda: ("ack", (rng.choice(unacked),))),
            (1, lambda: ("ack", ("no-such-message",))),
            (2 if streams else 0, lambda: self._ack_through(rng.choice(streams))),
        ]
        weights = [weight for weight, _ in choices]
        [(_, make)] = rng.choices(choices, weights)
        return make()

    def _new_attempt(self, now: float) -> Op:
        # Ids with '/', ' ' and '|' exercise the §7.6 interrupted-id rule; a
        # second attempt of an earlier task is a new attempt.
        n = self.count
        if self.model.order and self._random.random() < 0.2:
            task = self._random.choice(self.model.order)[0]
        else:
            task = f"job/{self.seed}-{n}"
        attempt = self._random.choice([f"att {n}", f"a|{n}", f"{n}"])
        return "record_received", (task, attempt, now)

    def _output(self, key: Key) -> Op:
        stream = self._random.choice(["stdout", "stderr"])
        sequence = self._next_sequence.get((key, stream), 1)
        self._next_sequence[(key, stream)] = sequence + 1
        data = self._random.choice(["x", "é", "line\n", "\u2603"]) * self._random.randint(1, 50)
        message_id = f"out-{self.seed}-{self.count}"
        payload = {"stream": stream, "sequence": sequence, "data": data}
        size = len(data.encode("utf-8"))
        return "enqueue_output", (*key, message_id, stream, sequence, payload, size,
                                  float(self.count + 1))

    def _final(self, key: Key) -> Op:
        code = self._random.choice([0, 1, 137])
        payload = {"status": "completed" if code == 0 else "failed", "exit_code": code,
                   "output": "é" * self._random.randint(0, 20), "output_truncated": False,
                   "error_truncated": False}
        return "record_final", (*key, f"final-{self.seed}-{self.count}", payload,
                                float(self.count + 1))

    def _ack_through(self, item: tuple[Key, str]) -> Op:
        key, stream = item
        sequence = self._random.randint(1, self._next_sequence[item] - 1)
        return "ack_through", (*key, stream, sequence)

    def step(self) -> Op:
        """The next call, already applied to :attr:`model`."""
        name, args = self._choose()
        self.model.apply(name, args)
        self.count += 1
        return name, args

    def finals(self, count: int) -> int:
        """How many of the first *count* calls write a final (a fresh Script's view)."""
        probe = Script(self.seed)
        written = 0
        for _ in range(count):
            before = len(probe.model.outbox)
            name, _args = probe.step()
            if name == "record_final" and len(probe.model.outbox) > before:
                written += 1
        return written


Kill = Callable[[str, tuple[Any, ...], bool], bool]
"""Told each statement before (False) and after (True) it runs: True means die now."""


class _Dying(Database):
    """A Database whose ``_exec`` (every statement passes there) dies when told."""

    def __init__(self, path: str, kill: Kill) -> None:
        self._kill = kill
        super().__init__(path)

    def _exec(self, sql: str, params: Any = ()) -> Any:
        if self._kill(sql, tuple(params), False):
            _die()
        result = super()._exec(sql, params)
        if self._kill(sql, tuple(params), True):
            _die()
        return result


def _say(*words: object) -> None:
    print(*words, flush=True)


def _die() -> None:
    _say("dying")
    os._exit(0)


def _final_insert(sql: str, params: tuple[Any, ...]) -> bool:
    return sql.startswith("INSERT INTO outbox") and len(params) > 3 and params[3] == FINAL


def _run(path: str, seed: int, mode: str, args: list[str]) -> None:
    state = {"statements": 0, "finals": 0}
    if mode == "exit":
        target, when = int(args[0]), args[1]

        def kill(sql: str, params: tuple[Any, ...], after: bool) -> bool:
            if not after:
                state["statements"] += 1
            return state["statements"] == target and after == (when == "after")
    elif mode == "final":
        target = int(args[0])

        def kill(sql: str, params: tuple[Any, ...], after: bool) -> bool:
            if after or not _final_insert(sql, params):
                return False
            state["finals"] += 1
            return state["finals"] == target
    else:
        def kill(sql: str, params: tuple[Any, ...], after: bool) -> bool:
            return False

    db = _Dying(path, kill)
    script = Script(seed)
    limit = 100_000 if mode == "loop" else 200
    while script.count < limit:
        name, call_args = script.step()
        getattr(db, name)(*call_args)
        _say("committed", script.count)
    _say("finished")
    if mode == "loop":
        while True:  # Never exit by itself: the test kills this pid, and only it.
            signal.pause()
    os._exit(3)


def _recover(path: str, target: int) -> None:
    count = {"finals": 0}

    def kill(sql: str, params: tuple[Any, ...], after: bool) -> bool:
        if after or not _final_insert(sql, params):
            return False
        count["finals"] += 1
        return count["finals"] == target

    db = _Dying(path, kill)
    db.recover(RECOVER_AT)
    if target == 0:
        _die()
    _say("recovered")
    os._exit(3)


def _serve() -> None:
    for line in sys.stdin:
        words = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                _say("pid", os.getpid())
                if words[0] == "run":
                    _run(words[1], int(words[2]), words[3], words[4:])
                else:
                    _recover(words[1], int(words[2]))
            except BaseException:  # noqa: BLE001 - report, and never return into the server
                traceback.print_exc()
                sys.stderr.flush()
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        _say("end", os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    _serve()
