"""
Hypothesis against phase 2: the agent's task engine behind its session,
driven by a hostile control plane, message by message.

The whole agent side runs for real, in memory, on one ``Clock``: the client
(tests/fuzz_support.py's ``Driver`` plays the server), the task engine with
its outbox and spool, the runner and the SQLite store; the store's calls
complete when the fuzzer says, and task processes print and end when it
says (tests/fuzz_tasks_support.py).  Generated input, interleaved in any
order:

* ``task.deliver`` of a few task and attempt ids (so duplicates and
  re-deliveries are common; some ids differ only in ``/``, `` `` and ``-``),
  with hostile field values (wrong types, empty, unicode, NUL in the
  command, unknown keys, missing ids) and oversized ones;
* ``ack`` of the agent's own outputs and finals, of unknown ids and of near
  misses of them, with and without ``highest_output_sequence`` (below,
  at and above the acked one, 0, negative, the 64-bit ends), with odd types;
* ``agent.hello_ack`` with §7.2's directives: acknowledged finals (known and
  unknown), discarded attempts (queued, running, ended, unknown),
  ``output_replay`` (below, at and past what was sent), ``delivery_enabled``,
  invalid directive lists, and hello_acks of another hello;
* ``error``: §7.5's ``output_sequence_gap`` with known and unknown related
  ids and any accepted sequence, other retryable codes, non-retryable ones;
* task processes printing (on both streams, any bytes, while the spool
  pauses them) and ending (completed, failed, killed);
* store calls completing one by one or all at once, clock advances,
  connections lost and closed, ``stop()``/``start()``, reconnects.

Invariants, checked after every input (and at the end for the outbox):

* phase 1's (tests/test_fuzz.py): nothing escapes, the agent is active only
  on a matching hello_ack, one connection at a time, ``stop()`` leaves no
  timer;
* nothing is logged as a failure or at ``error``/``critical`` by the client,
  the engine, the runner or on the global log, and no store call fails;
* no attempt runs twice: the runner is asked to start each (task id,
  attempt id) at most once -- across reconnects, re-deliveries and
  duplicate deliveries -- unless a hello_ack discarded it in between and it
  was delivered again (§8.2: then it is a new attempt);
* no outbox message is lost: at the end, on a fresh connection acked by a
  plain hello_ack, every output and final the agent stored is either acked
  by the control plane (``ack``, cumulatively, a hello_ack's finals list or
  ``output_replay``), deleted by a discard it directed, or sent again with
  the id, payload and sequence it was stored with.

The budget is ``HOSTLINK_FUZZ_EXAMPLES`` as for tests/test_fuzz.py; each
test here takes a tenth of it (``make fuzz``: 10,000 examples each), and
without it 40 each, derandomised, for ``make test``.
"""

from __future__ import annotations

import shutil
from typing import Any

from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.agent.tasks import TaskEngine
from hostlink_tw.wire.vocabulary import TASK_OUTPUT

from .fuzz_support import Act, Advance, FuzzTestCase, Message, Send, use_txaio_clock
from .fuzz_tasks_fakes import patch_processes, store_directory
from .fuzz_tasks_support import (
    DELETE,
    TASK_MAX_BYTES,
    AckOf,
    Deliver,
    Emit,
    ErrorOf,
    Exit,
    HelloAck,
    Reconnect,
    Ref,
    Seq,
    StoreHeld,
    StoreStep,
    TaskConfig,
    TaskDriver,
)

# --- strategies ----------------------------------------------------------------------------

_hostile_id = st.sampled_from(
    ["", " ", "t0 ", "T0", "t/x", "t x", "t|x", "\u202e", "t\ud800", "\x00", "x" * 300, 5,
     None, [], {}, True]
)
_hostile_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**65), max_value=2**65),
    st.sampled_from([1.5, -1, 2**63 - 1, 2**63, "", "1", "\u00e9\u202e", "\ud800", [], {}]),
)
_deliver_mutation = st.one_of(
    st.tuples(st.just("top"), st.sampled_from(["task_id", "execution_attempt_id"]),
              st.one_of(_hostile_id, st.just(DELETE))),
    st.tuples(st.just("payload"), st.sampled_from(["command", "priority", "extra"]),
              st.one_of(_hostile_scalar, st.just(DELETE))),
    st.tuples(st.just("top"), st.sampled_from(["sequence", "payload", "type"]),
              st.one_of(_hostile_scalar, st.just(DELETE))),
)
_deliver = st.builds(
    Deliver,
    st.integers(min_value=0, max_value=4),
    st.integers(min_value=0, max_value=3),
    st.sampled_from(["echo hi", "echo hi", "true", "printf '%s' é", "a\x00b", "x" * 2000]),
    st.one_of(st.just(()), st.just(()), st.just(()),
              st.lists(_deliver_mutation, max_size=2).map(tuple)),
    st.sampled_from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, TASK_MAX_BYTES]),
)
_ref = st.builds(
    Ref,
    st.sampled_from(["output", "output", "output", "final", "final", "any", "unknown", "prefix",
                     "suffix", "empty"]),
    st.integers(min_value=0, max_value=7),
)
_seq = st.one_of(
    st.just(Seq()),
    st.builds(Seq, st.just("rel"), st.integers(min_value=-2, max_value=3)),
    st.builds(Seq, st.just("abs"),
              st.sampled_from([0, 1, 2, 5, -1, 100, 2**63 - 1, -(2**63)])),
)
_ack_mutation = st.tuples(
    st.just("payload"),
    st.sampled_from(["highest_output_sequence", "acked_type", "acked_message_id", "extra"]),
    st.one_of(_hostile_scalar, st.just(DELETE)),
)
_ack = st.builds(
    AckOf, _ref, _seq, st.sampled_from([TASK_OUTPUT, TASK_OUTPUT, "task.final", "x"]),
    st.one_of(st.just(()), st.lists(_ack_mutation, max_size=1).map(tuple)),
)
_attempt_index = st.tuples(st.integers(min_value=0, max_value=4),
                           st.integers(min_value=0, max_value=3))
_hello_ack_mutation = st.tuples(
    st.just("payload"),
    st.sampled_from(["acknowledged_final_message_ids", "discarded_attempts", "output_replay",
                     "delivery_enabled"]),
    st.one_of(
        _hostile_scalar,
        st.sampled_from([[5], [None], [{}], [{"task_id": "t0"}],
                         [{"task_id": "t0", "execution_attempt_id": "a0", "stream": "stdout",
                           "next_sequence": 0}],
                         [{"task_id": "t0", "execution_attempt_id": "a0", "stream": "x",
                           "next_sequence": 1}]]),
    ),
)
_hello_ack = st.builds(
    HelloAck,
    st.lists(_ref, max_size=2).map(tuple),
    st.lists(_attempt_index, max_size=2).map(tuple),
    st.lists(st.tuples(_ref, _seq), max_size=2).map(tuple),
    st.sampled_from([True, True, False]),
    st.one_of(st.just(()), st.just(()), st.lists(_hello_ack_mutation, max_size=1).map(tuple)),
    st.sampled_from([False, False, False, False, True]),
)
_error = st.builds(
    ErrorOf,
    st.sampled_from(["output_sequence_gap", "output_sequence_gap", "output_sequence_gap",
                     "queue_full", "other"]),
    st.sampled_from([True, True, True, True, False, "true"]),
    _ref,
    _seq,
)
_content = st.one_of(_deliver, _deliver, _deliver, _ack, _ack, _ack, _hello_ack, _error)
_message = st.one_of(
    st.builds(Message, _content),
    st.builds(Message, _content),
    st.builds(Message, _content),
    # Fragmented: the same message in continuation frames.
    st.builds(Message, _content, st.just(False),
              st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=2)
              .map(tuple)),
)
_send = st.builds(
    Send, st.lists(_message, min_size=1, max_size=3).map(tuple),
    st.one_of(st.just(()), st.lists(st.integers(min_value=0, max_value=2000), max_size=2)
              .map(tuple)),
)
_emit = st.builds(
    Emit, st.integers(min_value=0, max_value=2), st.sampled_from(["stdout", "stdout", "stderr"]),
    st.one_of(st.sampled_from([b"x", b"line\n", b"y" * 1000, b"\xff\xfe\x00"]),
              st.binary(min_size=1, max_size=64)),
    st.sampled_from([1, 1, 2, 4, 8]),
)
_exit = st.builds(Exit, st.integers(min_value=0, max_value=2),
                  st.sampled_from([0, 0, 1, 2, None]))
_store = st.one_of(st.builds(StoreStep, st.sampled_from([1, 1, 2, 3, 0])),
                   st.builds(StoreHeld, st.booleans()))
_advance = st.builds(Advance, st.sampled_from([0.5, 1.0, 3.0, 5.0, 30.0]))
_act = st.builds(Act, st.sampled_from(["lose", "finish", "pongs", "pongs", "stop", "start"]))

_valid_deliver = st.builds(
    Send, st.tuples(st.builds(Message, st.builds(Deliver, st.integers(min_value=0, max_value=4),
                                                  st.integers(min_value=0, max_value=3)))),
)
_reconnect = st.builds(Reconnect, st.one_of(st.none(), _hello_ack, _hello_ack, _hello_ack))

#: One life of the agent with tasks: the fuzzer's control plane, the tasks and the store.
#: (Weighted: one_of picks a branch uniformly; tasks must start for outbox traffic.)
task_steps = st.lists(
    st.one_of(_send, _send, _send, _valid_deliver, _valid_deliver, _store, _store, _emit,
              _emit, _emit, _exit, _reconnect, _advance, _act),
    min_size=1,
    max_size=40,
)
_config = st.builds(TaskConfig, st.sampled_from([1, 1, 2]), st.sampled_from([3, 16]),
                    st.sampled_from([8192, 64 * 1024]))


# --- the tests ---------------------------------------------------------------------------


class TaskFuzzTestCase(FuzzTestCase):
    """A directory for the store files, and the runner's processes faked."""

    #: Each test takes a tenth of the budget (an example costs tens of milliseconds):
    #: 40 examples each in ``make test``, 10,000 of ``make fuzz``'s 100,000.
    default_budget = 400

    def setUp(self) -> None:
        super().setUp()
        self.dir = store_directory()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.factory = patch_processes(self)

    def life(self, config: TaskConfig, steps: list[Any], activate: bool = False) -> TaskDriver:
        """One example: run ``steps``, check the outbox, stop everything cleanly."""
        driver = TaskDriver(self.factory, self.dir, config=config)
        driver.start()
        if activate:
            # Active, with two attempts delivered (one or both running): traffic from the start.
            driver.run([StoreStep(0), Send((Message(HelloAck()),)),
                        Send((Message(Deliver(0, 0)), Message(Deliver(1, 1)))), StoreStep(0)])
            assert driver.h.client.is_active
        driver.run(steps)
        driver.check_outbox()
        driver.finish_tasks()
        driver.finish(self, self.txaio_clock)
        driver.remove_files()
        return driver


class TaskFuzzTests(TaskFuzzTestCase):
    """Deliveries, acks, directives and errors against the engine, over whole lives."""

    def test_task_sessions(self) -> None:
        """From the connection on: hello_acks with directives among everything else."""
        self.explore(0.1, st.tuples(_config, task_steps),
                     lambda example: self.life(*example))

    def test_active_session(self) -> None:
        """A session active from the start with tasks running, then anything
        (more traffic for the outbox)."""
        self.explore(0.1, st.tuples(_config, task_steps),
                     lambda example: self.life(*example, activate=True))


def _deliver_and_run(driver: TaskDriver, task: int = 0, attempt: int = 0) -> None:
    driver.run([Send((Message(Deliver(task, attempt)),)), StoreStep(0)])


class _HarnessCase(SynchronousTestCase):
    """txaio on a Clock, a store directory, fake task processes."""

    def setUp(self) -> None:
        self.txaio_clock = use_txaio_clock(self)
        self.dir = store_directory()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.factory = patch_processes(self)


class TaskDriverTests(_HarnessCase):
    """The phase-2 harness can fail: a broken engine or a broken check is caught."""

    def driver(self, **kwargs: Any) -> TaskDriver:
        driver = TaskDriver(self.factory, self.dir, **kwargs)
        driver.start()
        driver.run([StoreStep(0), Send((Message(HelloAck()),)), StoreStep(0)])
        self.assertTrue(driver.h.client.is_active)
        return driver

    def test_a_task_runs_and_its_messages_are_replayed(self) -> None:
        """The harness works: a delivered task runs once; its output and final
        are stored, sent, and sent again on the fresh session."""
        driver = self.driver()
        _deliver_and_run(driver)
        self.assertEqual(len(driver.processes), 1)
        driver.run([Emit(0, "stdout", b"one"), Emit(0, "stderr", b"two"), Exit(0, 0),
                    StoreStep(0)])
        types = [d["type"] for d in driver.lines[-1].conn.texts()]
        self.assertEqual(types, ["agent.hello", "task.received", "task.started", "task.output",
                                 "task.output", "task.final"])
        self.assertEqual(len(driver.oracle.stored), 3)
        driver.check_outbox()
        replayed = [d["type"] for d in driver.lines[-1].conn.texts()]
        self.assertEqual(replayed.count("task.output"), 2)
        self.assertEqual(replayed.count("task.final"), 1)
        driver.finish_tasks()
        driver.finish(self, self.txaio_clock)

    def test_acked_messages_are_not_required_again(self) -> None:
        driver = self.driver()
        _deliver_and_run(driver)
        driver.run([Emit(0, "stdout", b"a"), Emit(0, "stdout", b"b"), StoreStep(0),
                    Send((Message(AckOf(Ref("output", 1), Seq("rel", 0))),)), StoreStep(0)])
        self.assertEqual(len(driver.oracle.stored), 2)
        driver.check_outbox()
        replayed = [d for d in driver.lines[-1].conn.texts() if d["type"] == TASK_OUTPUT]
        self.assertEqual(replayed, [])  # both acked, the first cumulatively
        driver.finish_tasks()
        driver.finish(self, self.txaio_clock)

    def test_an_attempt_run_twice_is_caught(self) -> None:
        """An engine that starts whatever is delivered, without asking the store."""

        class Rerun(TaskEngine):
            def _answer(self, receipt: Any, envelope: Any, channel: Any, command: str) -> None:
                self._enqueue(self._make_spec(envelope.task_id,
                                              envelope.execution_attempt_id, command))

            def before_start(self, spec: Any) -> Any:
                return succeed(True)

        driver = self.driver(make_engine=Rerun)
        _deliver_and_run(driver)
        driver.run([Exit(0, 0), StoreStep(0)])
        with self.assertRaises(AssertionError) as caught:
            _deliver_and_run(driver)
        self.assertIn("spawned again", str(caught.exception))

    def test_a_second_run_beside_the_first_is_caught(self) -> None:
        """Even a legitimate new run of an attempt may not start while the old one runs."""
        driver = self.driver()
        _deliver_and_run(driver)
        (first,) = driver.processes
        driver.oracle.discards_directed.add(("t0", "a0"))
        driver.oracle.discards_run[("t0", "a0")] = [driver.oracle.calls + 1]
        again = type(first)(driver, first.spec, None, driver.h.reactor, first.on_output,
                            driver.runner._log)
        again.spawn([], {}, None, False)
        with self.assertRaises(AssertionError) as caught:
            driver.check()
        self.assertIn("while an earlier run of it runs", str(caught.exception))

    def test_a_discarded_attempt_may_run_again(self) -> None:
        """§8.2: discarded by a hello_ack and delivered again, it is a new attempt."""
        driver = self.driver()
        _deliver_and_run(driver)
        driver.run([Act("lose"), Advance(8.0), StoreStep(0),
                    Send((Message(HelloAck(discards=((0, 0),))),)), StoreStep(0)])
        self.assertTrue(driver.h.client.is_active)
        _deliver_and_run(driver)
        self.assertEqual(len(driver.processes), 2)
        driver.check_outbox()
        driver.finish_tasks()
        driver.finish(self, self.txaio_clock)

    def test_a_lost_message_is_caught(self) -> None:
        """An outbox that takes every ack as cumulative loses the rest of the stream."""

        class Greedy(TaskEngine):
            def session_started(self, session: Any) -> None:
                super().session_started(session)
                acked = self.outbox.acked
                self.outbox.acked = lambda m, h: acked(m, 2**62)  # type: ignore[method-assign]

        driver = self.driver(make_engine=Greedy)
        _deliver_and_run(driver)
        driver.run([Emit(0, "stdout", b"a"), Emit(0, "stdout", b"b"), StoreStep(0),
                    Send((Message(AckOf(Ref("output", 0))),)), StoreStep(0)])
        with self.assertRaises(AssertionError) as caught:
            driver.check_outbox()
        self.assertIn("outbox messages lost", str(caught.exception))

    def test_a_changed_payload_is_caught(self) -> None:
        """A message sent again must be the one stored (§7.6)."""
        driver = self.driver()
        _deliver_and_run(driver)
        driver.run([Emit(0, "stdout", b"a"), StoreStep(0)])
        ((message, at),) = driver.oracle.stored.values()
        changed = type(message)(*[
            {"stream": "stdout", "data": "b", "byte_count": 1} if f == "payload" else
            getattr(message, f) for f in message.__dataclass_fields__
        ])
        driver.oracle.stored[message.message_id] = (changed, at)
        with self.assertRaises(AssertionError) as caught:
            driver.check_outbox()
        self.assertIn(message.message_id, str(caught.exception))

    def test_an_error_logged_by_the_engine_is_caught(self) -> None:
        driver = self.driver()
        driver.engine.log.error("the store broke")
        with self.assertRaises(AssertionError) as caught:
            driver.check()
        self.assertIn("the store broke", str(caught.exception))

    def test_a_failed_store_call_is_caught(self) -> None:
        """A store call after the store closed fails: the check sees it."""
        driver = self.driver()
        driver.store.stop()
        driver.settle()
        driver.store.unacked().addErrback(lambda f: None)
        with self.assertRaises(AssertionError) as caught:
            driver.check()
        self.assertIn("unacked: task store", str(caught.exception))



class FoundByFuzzingTests(_HarnessCase):
    """Minimal reproductions of what the phase-2 fuzzing found, kept as regression tests."""

    def test_interrupted_finals_of_attempts_whose_ids_map_to_one(self) -> None:
        """
        §7.6's ``interrupted`` id replaces ``/``, `` `` and ``|`` by ``-`` and
        joins task and attempt with ``-``, so (``t-x``, ``a0``) and (``t``,
        ``x-a0``) share one.  Both interrupted (two slots, a shutdown), the
        second final used to fail the store's unique message id: lost, its
        attempt left ``running`` -- and every later start's recovery failed
        on the same id, refusing all delivery.  Each now gets its final.
        """
        driver = TaskDriver(self.factory, self.dir, config=TaskConfig(concurrency=2))
        driver.start()
        driver.run([StoreStep(0), Send((Message(HelloAck()),)),
                    Send((Message(Deliver(2, 0)),)), Send((Message(Deliver(3, 2)),))])
        self.assertEqual([(p.spec.task_id, p.spec.attempt_id) for p in driver.processes],
                         [("t-x", "a0"), ("t", "x-a0")])
        driver.finish_tasks()
        finals = {(m.task_id, m.attempt_id): m for m, _ in driver.oracle.stored.values()}
        self.assertEqual(sorted(finals), [("t", "x-a0"), ("t-x", "a0")])
        self.assertEqual(len({m.message_id for m in finals.values()}), 2)
        self.assertEqual({m.payload["status"] for m in finals.values()}, {"interrupted"})
        driver.finish(self, self.txaio_clock)
