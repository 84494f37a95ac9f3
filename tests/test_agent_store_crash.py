"""Crash consistency of the local task store (issue 12, the "Store" tests).

A real child process (``tests/store_crash_child.py``) makes a deterministic
stream of store calls for a seed -- receipts, starts, output chunks, finals,
acks by id and cumulative acks -- and says ``committed N`` after each call
returns.  It dies at a random statement (``os._exit``, inside a transaction or
between two), between the ``UPDATE`` that ends an attempt and the ``INSERT``
of its final, or by SIGKILL from here at a random moment.  Reopened here, the
file must hold exactly what the first N calls leave, or what the first N + 1
leave (the call in flight may have committed without saying so): never part
of a call.  PROTOCOL §8.7 asks for that of every state change; §8.8 for the
recovery checked after each crash: ``running`` becomes ``interrupted`` once,
with the §7.6 id, and received attempts are still queued.
"""

from __future__ import annotations

import os
import random
import select
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.agent.store import SCHEMA_VERSION, Database, interrupted_message_id
from tests.store_crash_child import RECOVER_AT, Model, Script, snapshot

HELPER = Path(__file__).with_name("store_crash_child.py")
# For one child's whole run; they take milliseconds.
TIMEOUT = 30.0


@dataclass
class Run:
    """What one child said: its last ``committed`` count and how it ended."""

    committed: int
    died: bool
    finished: bool
    exit_code: int


class ForkServer:
    """``store_crash_child.py`` as a fork server, in its own process group.

    Starting Python with the store imported costs half a second; forking a
    child per run costs a millisecond, so twenty seeds stay fast.
    """

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self._errors: IO[bytes] = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, str(HELPER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._errors,
            env=env,
            start_new_session=True,  # one group: the cleanup can end the server and its child
        )
        self._buffer = b""

    def stop(self) -> None:
        """End the server (EOF on its stdin), or kill its process group."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process.stdout.close()
        self._errors.close()

    def errors(self) -> str:
        """What the server and its children wrote to stderr (tracebacks)."""
        self._errors.seek(0)
        return self._errors.read().decode("utf-8", "replace")

    def _line(self, deadline: float) -> str:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"no answer from the store child; stderr: {self.errors()}")
            data = os.read(fd, 65536)
            if not data:
                raise AssertionError(f"the store child's server ended; stderr: {self.errors()}")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def run(self, *words: object, kill_after: int | None = None) -> Run:
        """Send one command and read its child's lines up to ``end``.

        :param kill_after: SIGKILL the child once it has said this many
            ``committed`` lines (it never exits by itself in ``loop`` mode,
            so its pid is still its own).
        """
        assert self.process.stdin is not None
        self.process.stdin.write((" ".join(map(str, words)) + "\n").encode())
        self.process.stdin.flush()
        deadline = time.monotonic() + TIMEOUT
        first = self._line(deadline).split()
        assert first[0] == "pid", (first, self.errors())
        child = int(first[1])
        committed, died, finished, seen = 0, False, False, 0
        while True:
            word, *rest = self._line(deadline).split()
            if word == "committed":
                committed = int(rest[0])
                seen += 1
                if seen == kill_after:
                    os.kill(child, signal.SIGKILL)
            elif word == "dying":
                died = True
            elif word in ("finished", "recovered"):
                finished = True
            elif word == "end":
                return Run(committed, died, finished, int(rest[0]))


class CrashTests(SynchronousTestCase):
    """Every kind of death leaves whole calls only, and recovery runs once."""

    def setUp(self) -> None:
        self.server = ForkServer()
        self.addCleanup(self.server.stop)
        self.random = random.Random()
        self.base = self.random.randrange(1_000_000)
        # How many checks met running and queued attempts (so none was vacuous).
        self.seen = {"running": 0, "queued": 0, "in flight committed": 0}

    def path(self) -> str:
        directory = self.mktemp()
        os.mkdir(directory)
        return os.path.join(directory, "task_store.db")

    def models(self, seed: int, committed: int) -> tuple[Model, Model]:
        """The model after the reported calls, and after one more."""
        before, after = Script(seed), Script(seed)
        for _ in range(committed):
            before.step()
        for _ in range(committed + 1):
            after.step()
        return before.model, after.model

    def reopen(self, path: str, context: str) -> tuple[Database, sqlite3.Connection]:
        """Open the file as the agent does after a crash, and check what it is."""
        db = Database(path)  # quick_check, migration: a StoreError fails the test
        self.addCleanup(db.close)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA integrity_check").fetchall(), [("ok",)], context)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        names = {n for (n,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}
        self.assertEqual(names, {"executions", "outbox", "outbox_unacked"}, context)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, context)
        return db, conn

    def check_file(self, conn: sqlite3.Connection, seed: int, run: Run, context: str) -> Model:
        """The file holds the first N calls, or N + 1; never part of one.  The model it holds."""
        before, after = self.models(seed, run.committed)
        actual = snapshot(conn)
        if actual == after.snapshot() and actual != before.snapshot():
            self.seen["in flight committed"] += 1
            model = after
        else:
            self.assertEqual(actual, before.snapshot(), context)
            model = before
        # No half rows, said directly: an ended attempt has its final, a
        # final has its ended attempt, an output has its attempt.
        executions, outbox = actual
        ended = {(t, a) for t, a, state, *_ in executions if state == "ended"}
        with_final = {(t, a) for _, t, a, kind, *_ in outbox if kind == "task.final"}
        self.assertEqual(ended, with_final, context)
        attempts = {(t, a) for t, a, *_ in executions}
        self.assertLessEqual({(t, a) for _, t, a, *_ in outbox}, attempts, context)
        return model

    def check_recovery(self, path: str, db: Database, model: Model, context: str) -> None:
        """Recovery ends each running attempt once, with its §7.6 final; queued stay queued."""
        running, queued = model.running(), model.queued()
        self.seen["running"] += bool(running)
        self.seen["queued"] += bool(queued)
        finals = db.recover(RECOVER_AT)
        self.assertEqual([m.message_id for m in finals],
                         [interrupted_message_id(*key) for key in running], context)
        for final in finals:
            self.assertEqual(final.payload["status"], "interrupted")
            self.assertEqual(final.payload["exit_code"], -1)
        self.assertEqual(db.recover(RECOVER_AT + 1), [], context)
        self.assertEqual([(q.task_id, q.attempt_id) for q in db.queued_attempts()], queued,
                         context)
        db.close()
        again = Database(path)
        self.addCleanup(again.close)
        self.assertEqual(again.recover(RECOVER_AT + 2), [], context)
        self.assertEqual([(q.task_id, q.attempt_id) for q in again.queued_attempts()], queued,
                         context)
        model.recover(RECOVER_AT)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(snapshot(conn), model.snapshot(), context)

    def crash_and_check(self, seed: int, *command: object, kill_after: int | None = None) -> Run:
        path = self.path()
        context = f"seed {seed}: {' '.join(map(str, command))} kill_after={kill_after}"
        run = self.server.run("run", path, seed, *command, kill_after=kill_after)
        expected = (True, 0) if kill_after is None else (False, -signal.SIGKILL)
        self.assertEqual((run.died, run.exit_code), expected, f"{context}; {self.server.errors()}")
        db, conn = self.reopen(path, context)
        model = self.check_file(conn, seed, run, context)
        self.check_recovery(path, db, model, context)
        return run

    def test_exit_at_random_statements(self) -> None:
        """os._exit before or after a random statement (BEGIN, inside, COMMIT), 20 seeds."""
        for n in range(20):
            seed = self.base + n
            statement = self.random.randint(1, 500)
            self.crash_and_check(seed, "exit", statement, self.random.choice(["before", "after"]))
        self.assertGreater(self.seen["running"], 0)
        self.assertGreater(self.seen["queued"], 0)

    def test_exit_between_ending_an_attempt_and_storing_its_final(self) -> None:
        """Dying after the UPDATE to 'ended' and before the final's INSERT keeps neither."""
        for n in range(6):
            seed = self.base + 100 + n
            finals = Script(seed).finals(200)
            if finals == 0:
                continue
            run = self.crash_and_check(seed, "final", self.random.randint(1, finals))
            # The call in flight was a record_final, and it did not commit.
            script = Script(seed)
            for _ in range(run.committed):
                script.step()
            self.assertEqual(script.step()[0], "record_final")
        self.assertEqual(self.seen["in flight committed"], 0)

    def test_sigkill_at_random_moments(self) -> None:
        """SIGKILL from outside while the child loops, 5 seeds."""
        for n in range(5):
            seed = self.base + 200 + n
            run = self.crash_and_check(seed, "loop", kill_after=self.random.randint(1, 300))
            self.assertFalse(run.finished)

    def test_exit_during_recovery(self) -> None:
        """A crash inside recover() leaves all of it or none; the next recovery ends each once."""
        checked = 0
        for n in range(40):
            if checked == 5:
                break
            seed = self.base + 300 + n
            path = self.path()
            kill_after = self.random.randint(20, 200)
            run = self.server.run("run", path, seed, "loop", kill_after=kill_after)
            context = f"seed {seed}: loop killed after {run.committed}"
            db, conn = self.reopen(path, context)
            model = self.check_file(conn, seed, run, context)
            db.close()
            if not model.running():
                continue
            checked += 1
            target = self.random.randint(0, len(model.running()))
            recovery = self.server.run("recover", path, target)
            context += f", recovery dying at final {target}"
            self.assertEqual((recovery.died, recovery.exit_code), (True, 0),
                             f"{context}; {self.server.errors()}")
            db, conn = self.reopen(path, context)
            recovered = snapshot(conn)
            if target == 0:  # died after the commit: all of it
                model.recover(RECOVER_AT)
            self.assertEqual(recovered, model.snapshot(), context)
            self.check_recovery(path, db, model, context)
        self.assertEqual(checked, 5)
