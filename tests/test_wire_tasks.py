"""Tests for hostlink_tw.wire.tasks and hostlink_tw.wire.hello: the payloads of
PROTOCOL §7 (phase 2), and the phase-2 fields of hostlink_tw.wire.payloads.

As in test_protocol, the rule table generates one test method per row, so
each rule has its own named test, failing on its own if the rule is dropped.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.wire import errors
from hostlink_tw.wire.envelope import Envelope, format_sent_at, make_envelope, parse_envelope
from hostlink_tw.wire.errors import ProtocolError
from hostlink_tw.wire.payloads import (
    AckPayload,
    ErrorPayload,
    TaskFinalPayload,
    TaskOutputPayload,
    error_payload,
)
from hostlink_tw.wire.tasks import (
    NO_EXIT_CODE,
    Capabilities,
    DiscardedAttempt,
    HelloAckDirectives,
    HelloSnapshot,
    OutputReplay,
    ReceivedAttempt,
    RunningTask,
    SpoolStatus,
    StreamSequences,
    TaskDeliverPayload,
    UnackedFinal,
    UnackedOutput,
    check_empty_payload,
    decode_output,
    deliver_payload,
    final_payload,
    hello_ack_payload,
    hello_payload,
    interrupted_final_message_id,
    interrupted_final_payload,
    output_payload,
    phase2_payload,
    task_message_id,
)
from hostlink_tw.wire.vocabulary import (
    ACK,
    AGENT_HELLO,
    AGENT_HELLO_ACK,
    ERROR,
    MESSAGE_TYPES,
    TASK_DELIVER,
    TASK_FINAL,
    TASK_LEASE_HEARTBEAT,
    TASK_OUTPUT,
    TASK_RECEIVED,
    TASK_STARTED,
    TASK_TYPES,
)

AGENT = "agent-1"
T0 = "2026-04-27T11:02:00Z"
T1 = "2026-04-27T11:03:00Z"

# Modest budget, as test_protocol: the whole suite must stay fast on 2 cores.
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Every list holds two entries, so the rules below can name index 1 and prove
# that the error's path carries the index.
VALID_HELLO: dict[str, Any] = {
    "capabilities": {"delivery_enabled": True, "results_enabled": True},
    "client_version": "0.4.0",
    "running_task": {
        "task_id": "task_9",
        "execution_attempt_id": "attempt_9",
        "started_at": T0,
        "last_output_sequence": {"stdout": 4, "stderr": 0},
    },
    "received_not_started": [
        {"task_id": "task_1", "execution_attempt_id": "attempt_1", "received_at": T0},
        {"task_id": "task_2", "execution_attempt_id": "attempt_2", "received_at": T1},
    ],
    "unacked_finals": [
        {"message_id": "local-interrupted-task_3-attempt_3", "task_id": "task_3",
         "execution_attempt_id": "attempt_3", "status": "interrupted", "exit_code": -1,
         "output_truncated": False, "error_truncated": False},
        {"message_id": "msg-task_4-attempt_4-final-0-1", "task_id": "task_4",
         "execution_attempt_id": "attempt_4", "status": "failed", "exit_code": 2,
         "output": "out", "error": "err", "output_truncated": True, "error_truncated": False},
    ],
    "unacked_output": [
        {"task_id": "task_9", "execution_attempt_id": "attempt_9", "stream": "stdout",
         "first_sequence": 1, "last_sequence": 4, "truncated_locally": False},
        {"task_id": "task_9", "execution_attempt_id": "attempt_9", "stream": "stderr",
         "first_sequence": 3, "last_sequence": 3, "truncated_locally": True},
    ],
    "spool_status": {"byte_cap": 67108864, "bytes_used": 1234, "has_rotated_chunks": False},
}

VALID_HELLO_ACK: dict[str, Any] = {
    "acked_message_id": "msg_1",
    "acked_type": AGENT_HELLO,
    "acknowledged_final_message_ids": ["msg-final-1", "msg-final-2"],
    "discarded_attempts": [
        {"task_id": "task_1", "execution_attempt_id": "attempt_1", "reason": "cancelled"},
        {"task_id": "task_2", "execution_attempt_id": "attempt_2", "reason": "expired"},
    ],
    "output_replay": [
        {"task_id": "task_9", "execution_attempt_id": "attempt_9", "stream": "stdout",
         "next_sequence": 5},
        {"task_id": "task_9", "execution_attempt_id": "attempt_9", "stream": "stderr",
         "next_sequence": 1},
    ],
    "delivery_enabled": True,
}

VALID_DELIVER: dict[str, Any] = {"command": "echo hi", "priority": 2}

VALID_ERROR: dict[str, Any] = {
    "code": "output_sequence_gap", "message": "expected 4", "retryable": True,
    "related_message_id": "msg-x", "highest_accepted_sequence": 3,
}

PARSERS: dict[str, tuple[Callable[[Any], Any], dict[str, Any]]] = {
    "hello": (HelloSnapshot.from_dict, VALID_HELLO),
    "hello_ack": (HelloAckDirectives.from_dict, VALID_HELLO_ACK),
    "deliver": (TaskDeliverPayload.from_dict, VALID_DELIVER),
    "error": (ErrorPayload.from_dict, VALID_ERROR),
}

Path = tuple[str | int, ...]
DROP = object()  # the action that deletes the key instead of setting it


def path_text(path: Path) -> str:
    """``("unacked_output", 1, "stream")`` → ``payload.unacked_output[1].stream``."""
    return "payload" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}"
                               for part in path)


def mutated(document: dict[str, Any], path: Path, value: Any) -> dict[str, Any]:
    """Return a deep copy of *document* with *path* set to *value* (or deleted: DROP)."""
    result = copy.deepcopy(document)
    target: Any = result
    for part in path[:-1]:
        target = target[part]
    if value is DROP:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return result


def _method_name(text: str) -> str:
    return "test_" + re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_")


INVALID = errors.INVALID_PAYLOAD
RANGE = errors.NUMBER_OUT_OF_RANGE
BIG = 2**63

# (kind, path, value or DROP, expected code, expected field or None for the path itself)
RULES: list[tuple[str, Path, Any, str, str | None]] = []


def rule(kind: str, path: Path, value: Any, code: str = INVALID,
         field: str | None = None) -> None:
    RULES.append((kind, path, value, code, field))


# --- agent.hello (§7.1) ---------------------------------------------------------------------
for _key in ("capabilities", "client_version", "running_task", "received_not_started",
             "unacked_finals", "unacked_output", "spool_status"):
    rule("hello", (_key,), DROP)
rule("hello", ("capabilities",), None)
rule("hello", ("capabilities",), [True, True])
for _key in ("delivery_enabled", "results_enabled"):
    rule("hello", ("capabilities", _key), DROP)
    rule("hello", ("capabilities", _key), 1)
    rule("hello", ("capabilities", _key), None)
    rule("hello", ("capabilities", _key), "true")
rule("hello", ("client_version",), "")
rule("hello", ("client_version",), 4)
rule("hello", ("client_version",), None)
rule("hello", ("running_task",), [])
rule("hello", ("running_task",), "task_9")
for _key in ("task_id", "execution_attempt_id"):
    rule("hello", ("running_task", _key), DROP)
    rule("hello", ("running_task", _key), "")
    rule("hello", ("running_task", _key), 9)
for _key, _values in (("started_at", ["2026-04-27T11:02:00.5Z", "2026-04-27T13:02:00+02:00",
                                      "2026-02-30T00:00:00Z", "", 1777287720, None]),):
    rule("hello", ("running_task", _key), DROP)
    for _value in _values:
        rule("hello", ("running_task", _key), _value)
rule("hello", ("running_task", "last_output_sequence"), DROP)
rule("hello", ("running_task", "last_output_sequence"), None)
rule("hello", ("running_task", "last_output_sequence"), [4, 0])
for _key in ("stdout", "stderr"):
    rule("hello", ("running_task", "last_output_sequence", _key), DROP)
    rule("hello", ("running_task", "last_output_sequence", _key), -1)
    rule("hello", ("running_task", "last_output_sequence", _key), True)
    rule("hello", ("running_task", "last_output_sequence", _key), 4.0)
    rule("hello", ("running_task", "last_output_sequence", _key), "4")
    rule("hello", ("running_task", "last_output_sequence", _key), BIG, RANGE)
for _key in ("received_not_started", "unacked_finals", "unacked_output"):
    rule("hello", (_key,), {})
    rule("hello", (_key,), "[]")
    rule("hello", (_key, 1), None)
    rule("hello", (_key, 1), [])
    for _id in ("task_id", "execution_attempt_id"):
        rule("hello", (_key, 1, _id), DROP)
        rule("hello", (_key, 1, _id), "")
        rule("hello", (_key, 1, _id), False)
rule("hello", ("received_not_started", 1, "received_at"), DROP)
rule("hello", ("received_not_started", 1, "received_at"), "2026-04-27")
rule("hello", ("received_not_started", 1, "received_at"), "2026-04-27T11:03:60Z")
rule("hello", ("unacked_finals", 1, "message_id"), DROP)
rule("hello", ("unacked_finals", 1, "message_id"), "")
rule("hello", ("unacked_finals", 1, "message_id"), 1)
rule("hello", ("unacked_finals", 1, "status"), DROP)
rule("hello", ("unacked_finals", 1, "status"), "running")
rule("hello", ("unacked_finals", 1, "status"), "FAILED")
rule("hello", ("unacked_finals", 1, "exit_code"), DROP)
rule("hello", ("unacked_finals", 1, "exit_code"), 2.5)
rule("hello", ("unacked_finals", 1, "exit_code"), False)
rule("hello", ("unacked_finals", 1, "exit_code"), -BIG - 1, RANGE)
rule("hello", ("unacked_finals", 1, "output"), 7)
rule("hello", ("unacked_finals", 1, "error"), None)
for _key in ("output_truncated", "error_truncated"):
    rule("hello", ("unacked_finals", 1, _key), DROP)
    rule("hello", ("unacked_finals", 1, _key), 0)
    rule("hello", ("unacked_finals", 1, _key), "false")
rule("hello", ("unacked_output", 1, "stream"), DROP)
rule("hello", ("unacked_output", 1, "stream"), "stdin")
rule("hello", ("unacked_output", 1, "stream"), "STDERR")
for _key in ("first_sequence", "last_sequence"):
    rule("hello", ("unacked_output", 1, _key), DROP)
    rule("hello", ("unacked_output", 1, _key), 0)
    rule("hello", ("unacked_output", 1, _key), -3)
    rule("hello", ("unacked_output", 1, _key), True)
    rule("hello", ("unacked_output", 1, _key), 3.0)
    rule("hello", ("unacked_output", 1, _key), BIG, RANGE)
# first <= last: the error names last_sequence, which is below first
rule("hello", ("unacked_output", 1, "first_sequence"), 4, INVALID,
     "payload.unacked_output[1].last_sequence")
rule("hello", ("unacked_output", 1, "last_sequence"), 2)
rule("hello", ("unacked_output", 1, "truncated_locally"), DROP)
rule("hello", ("unacked_output", 1, "truncated_locally"), 1)
rule("hello", ("unacked_output", 1, "truncated_locally"), None)
rule("hello", ("spool_status",), None)
rule("hello", ("spool_status",), [])
for _key in ("byte_cap", "bytes_used"):
    rule("hello", ("spool_status", _key), DROP)
    rule("hello", ("spool_status", _key), -1)
    rule("hello", ("spool_status", _key), False)
    rule("hello", ("spool_status", _key), 1e3)
    rule("hello", ("spool_status", _key), BIG, RANGE)
rule("hello", ("spool_status", "has_rotated_chunks"), DROP)
rule("hello", ("spool_status", "has_rotated_chunks"), 0)

# --- agent.hello_ack (§7.2) -----------------------------------------------------------------
rule("hello_ack", ("acked_message_id",), DROP)  # the phase-1 rules still hold
rule("hello_ack", ("acked_message_id",), 1)
rule("hello_ack", ("acked_type",), DROP)
rule("hello_ack", ("acked_type",), None)
rule("hello_ack", ("acknowledged_final_message_ids",), "msg-final-1")
rule("hello_ack", ("acknowledged_final_message_ids",), {"msg-final-1": True})
rule("hello_ack", ("acknowledged_final_message_ids", 1), 2)
rule("hello_ack", ("acknowledged_final_message_ids", 1), None)
rule("hello_ack", ("acknowledged_final_message_ids", 1), ["msg-final-2"])
for _key in ("discarded_attempts", "output_replay"):
    rule("hello_ack", (_key,), {})
    rule("hello_ack", (_key,), True)
    rule("hello_ack", (_key, 1), "task_2")
    rule("hello_ack", (_key, 1), None)
    for _id in ("task_id", "execution_attempt_id"):
        rule("hello_ack", (_key, 1, _id), DROP)
        rule("hello_ack", (_key, 1, _id), "")
        rule("hello_ack", (_key, 1, _id), 2)
rule("hello_ack", ("discarded_attempts", 1, "reason"), 5)
rule("hello_ack", ("discarded_attempts", 1, "reason"), None)
rule("hello_ack", ("output_replay", 1, "stream"), DROP)
rule("hello_ack", ("output_replay", 1, "stream"), "final")
rule("hello_ack", ("output_replay", 1, "next_sequence"), DROP)
rule("hello_ack", ("output_replay", 1, "next_sequence"), 0)
rule("hello_ack", ("output_replay", 1, "next_sequence"), -1)
rule("hello_ack", ("output_replay", 1, "next_sequence"), True)
rule("hello_ack", ("output_replay", 1, "next_sequence"), 1.0)
rule("hello_ack", ("output_replay", 1, "next_sequence"), "1")
rule("hello_ack", ("output_replay", 1, "next_sequence"), BIG, RANGE)
rule("hello_ack", ("delivery_enabled",), "true")
rule("hello_ack", ("delivery_enabled",), 1)
rule("hello_ack", ("delivery_enabled",), None)

# --- task.deliver (§7.3) --------------------------------------------------------------------
rule("deliver", ("command",), DROP)
rule("deliver", ("command",), "")
rule("deliver", ("command",), None)
rule("deliver", ("command",), ["echo", "hi"])
rule("deliver", ("command",), 7)
rule("deliver", ("priority",), "2")  # the Go decoder refuses these two by name
rule("deliver", ("priority",), 2.5)
rule("deliver", ("priority",), 2.0)
rule("deliver", ("priority",), True)
rule("deliver", ("priority",), None)
rule("deliver", ("priority",), BIG, RANGE)

# --- error's highest_accepted_sequence (§7.5) -----------------------------------------------
rule("error", ("highest_accepted_sequence",), "3")
rule("error", ("highest_accepted_sequence",), 3.0)
rule("error", ("highest_accepted_sequence",), True)
rule("error", ("highest_accepted_sequence",), None)
rule("error", ("highest_accepted_sequence",), -BIG - 1, RANGE)


def _rule_test(kind: str, path: Path, value: Any, code: str, field: str | None) -> Any:
    parse, valid = PARSERS[kind]

    def test(self: RuleTests) -> None:
        error = self.assertRaises(ProtocolError, parse, mutated(valid, path, value))
        expected_field = path_text(path) if field is None else field
        self.assertEqual((error.code, error.field), (code, expected_field), str(error))
        # The message names the path too: it is what an operator reads.
        self.assertTrue(error.message.startswith(expected_field + " "), error.message)

    return test


class RuleTests(SynchronousTestCase):
    """One generated test per rule row (see RULES)."""

    def test_valid_documents(self) -> None:
        """Each reference document is valid, so each rule row isolates one change."""
        for parse, valid in PARSERS.values():
            parse(copy.deepcopy(valid))

    def test_not_an_object(self) -> None:
        """A payload that is not an object is refused as the payload itself."""
        for kind, (parse, _) in PARSERS.items():
            for value in (None, [], "x", 1):
                error = self.assertRaises(ProtocolError, parse, value)
                self.assertEqual((error.code, error.field), (INVALID, "payload"), kind)


for _kind, _path, _value, _code, _field in RULES:
    _label = "drop" if _value is DROP else f"{type(_value).__name__} {_value!r}"[:40]
    _name = f"{_kind} {path_text(_path)} {_label}"
    _test = _rule_test(_kind, _path, _value, _code, _field)
    _test.__doc__ = f"Rule: {_name} -> {_code}."
    assert not hasattr(RuleTests, _method_name(_name)), _name
    setattr(RuleTests, _method_name(_name), _test)


# --- happy paths -----------------------------------------------------------------------------


def _snapshot() -> HelloSnapshot:
    return HelloSnapshot(
        capabilities=Capabilities(delivery_enabled=True, results_enabled=True),
        client_version="0.4.0",
        running_task=RunningTask("task_9", "attempt_9", T0, StreamSequences(4, 0)),
        received_not_started=[ReceivedAttempt("task_1", "attempt_1", T0),
                              ReceivedAttempt("task_2", "attempt_2", T1)],
        unacked_finals=[
            UnackedFinal("local-interrupted-task_3-attempt_3", "task_3", "attempt_3",
                         TaskFinalPayload("interrupted", -1)),
            UnackedFinal("msg-task_4-attempt_4-final-0-1", "task_4", "attempt_4",
                         TaskFinalPayload("failed", 2, "out", "err", True, False)),
        ],
        unacked_output=[UnackedOutput("task_9", "attempt_9", "stdout", 1, 4),
                        UnackedOutput("task_9", "attempt_9", "stderr", 3, 3, True)],
        spool_status=SpoolStatus(67108864, 1234, False),
    )


class HelloSnapshotTests(SynchronousTestCase):
    """agent.hello (§7.1)."""

    def test_reference_document(self) -> None:
        """The reference document parses field by field into the expected snapshot."""
        snapshot = HelloSnapshot.from_dict(VALID_HELLO)
        self.assertEqual(snapshot, _snapshot())
        self.assertIsInstance(snapshot.received_not_started, tuple)

    def test_built_wire_form(self) -> None:
        """hello_payload writes exactly the §7.1 keys, every one present, lists as arrays."""
        self.assertEqual(hello_payload(_snapshot()), VALID_HELLO)

    def test_all_keys_present_when_empty(self) -> None:
        """An idle agent's hello still carries every key: null task, empty lists, zeros."""
        payload = hello_payload(HelloSnapshot(Capabilities(), "dev"))
        self.assertEqual(payload, {
            "capabilities": {"delivery_enabled": False, "results_enabled": False},
            "client_version": "dev",
            "running_task": None,
            "received_not_started": [],
            "unacked_finals": [],
            "unacked_output": [],
            "spool_status": {"byte_cap": 0, "bytes_used": 0, "has_rotated_chunks": False},
        })
        self.assertEqual(json.loads(json.dumps(payload))["running_task"], None)

    def test_round_trip(self) -> None:
        """from_dict(to_dict(x)) == x, lists given as lists or tuples alike."""
        snapshot = _snapshot()
        self.assertEqual(HelloSnapshot.from_dict(snapshot.to_dict()), snapshot)

    def test_running_task_null(self) -> None:
        """running_task may be null (nothing running)."""
        document = mutated(VALID_HELLO, ("running_task",), None)
        self.assertIsNone(HelloSnapshot.from_dict(document).running_task)

    def test_null_lists_read_empty(self) -> None:
        """A Go encoder writes a nil slice as null: read as an empty list."""
        for key in ("received_not_started", "unacked_finals", "unacked_output"):
            snapshot = HelloSnapshot.from_dict(mutated(VALID_HELLO, (key,), None))
            self.assertEqual(getattr(snapshot, key), ())

    def test_boundaries_accepted(self) -> None:
        """Sequence 0 means 'none yet'; first == last is a one-chunk range; zero bytes."""
        document = mutated(VALID_HELLO, ("running_task", "last_output_sequence", "stdout"), 0)
        document = mutated(document, ("unacked_output", 0, "last_sequence"), 1)
        document = mutated(document, ("unacked_output", 0, "first_sequence"), 1)
        document = mutated(document, ("spool_status", "byte_cap"), 0)
        document = mutated(document, ("unacked_output", 1, "last_sequence"), 2**63 - 1)
        snapshot = HelloSnapshot.from_dict(document)
        self.assertEqual(snapshot.unacked_output[0].first_sequence, 1)
        self.assertEqual(snapshot.unacked_output[1].last_sequence, 2**63 - 1)

    def test_final_without_texts(self) -> None:
        """A final's output and error are optional (omitted when empty, as Go does)."""
        final = HelloSnapshot.from_dict(VALID_HELLO).unacked_finals[0]
        self.assertEqual((final.final.output, final.final.error), ("", ""))
        self.assertNotIn("output", final.to_dict())

    def test_unknown_keys_ignored(self) -> None:
        """Unknown keys at any level are ignored (a later version may add some)."""
        document = mutated(VALID_HELLO, ("x_future",), {"a": 1})
        document = mutated(document, ("spool_status", "x_more"), [1])
        document = mutated(document, ("unacked_output", 1, "x_hint"), None)
        self.assertEqual(HelloSnapshot.from_dict(document), _snapshot())

    def test_builder_refuses_invalid(self) -> None:
        """hello_payload refuses what the control plane would refuse."""
        bad = [
            HelloSnapshot(Capabilities(), ""),
            HelloSnapshot(Capabilities(), "v", RunningTask("", "a", T0)),
            HelloSnapshot(Capabilities(), "v", RunningTask("t", "a", "yesterday")),
            HelloSnapshot(Capabilities(), "v", unacked_output=[UnackedOutput("t", "a",
                                                                            "stdout", 2, 1)]),
            HelloSnapshot(Capabilities(), "v", spool_status=SpoolStatus(-1, 0)),
        ]
        for snapshot in bad:
            self.assertRaises(ProtocolError, hello_payload, snapshot)


class HelloAckDirectivesTests(SynchronousTestCase):
    """agent.hello_ack (§7.2)."""

    def _directives(self) -> HelloAckDirectives:
        return HelloAckDirectives(
            "msg_1", AGENT_HELLO, ["msg-final-1", "msg-final-2"],
            [DiscardedAttempt("task_1", "attempt_1", "cancelled"),
             DiscardedAttempt("task_2", "attempt_2", "expired")],
            [OutputReplay("task_9", "attempt_9", "stdout", 5),
             OutputReplay("task_9", "attempt_9", "stderr", 1)],
            delivery_enabled=True,
        )

    def test_reference_document(self) -> None:
        """Every directive is read, in order."""
        self.assertEqual(HelloAckDirectives.from_dict(VALID_HELLO_ACK), self._directives())

    def test_built_wire_form(self) -> None:
        """hello_ack_payload writes the §7.2 keys."""
        self.assertEqual(hello_ack_payload(self._directives()), VALID_HELLO_ACK)

    def test_phase1_hello_ack(self) -> None:
        """A bare ack (phase 1, or a Go-era control plane) means: no directives, delivery off."""
        directives = HelloAckDirectives.from_dict({"acked_message_id": "m",
                                                   "acked_type": AGENT_HELLO})
        self.assertEqual(directives, HelloAckDirectives("m", AGENT_HELLO))
        self.assertFalse(directives.delivery_enabled)
        self.assertEqual(directives.ack, AckPayload("m", AGENT_HELLO))
        self.assertEqual(directives.to_dict(), {"acked_message_id": "m",
                                                "acked_type": AGENT_HELLO,
                                                "delivery_enabled": False})

    def test_null_and_empty_lists(self) -> None:
        """null (a Go nil slice) and [] read as no directive."""
        for value in (None, []):
            document = {"acked_message_id": "m", "acked_type": AGENT_HELLO,
                        "acknowledged_final_message_ids": value,
                        "discarded_attempts": value, "output_replay": value}
            self.assertEqual(HelloAckDirectives.from_dict(document),
                             HelloAckDirectives("m", AGENT_HELLO))

    def test_reason_optional(self) -> None:
        """A discarded attempt's reason is optional (the Go agent ignores it)."""
        document = mutated(VALID_HELLO_ACK, ("discarded_attempts", 0, "reason"), DROP)
        directives = HelloAckDirectives.from_dict(document)
        self.assertEqual(directives.discarded_attempts[0].reason, "")

    def test_round_trip(self) -> None:
        """from_dict(to_dict(x)) == x."""
        directives = self._directives()
        self.assertEqual(HelloAckDirectives.from_dict(directives.to_dict()), directives)

    def test_unknown_keys_ignored(self) -> None:
        """Unknown keys are ignored, nested ones too."""
        document = mutated(VALID_HELLO_ACK, ("x_new",), 1)
        document = mutated(document, ("output_replay", 0, "x_more"), {})
        self.assertEqual(HelloAckDirectives.from_dict(document), self._directives())


class DeliverTests(SynchronousTestCase):
    """task.deliver (§7.3), received and started (§7.4)."""

    def test_fields(self) -> None:
        """command and priority are read; priority defaults to 0 and may be negative."""
        self.assertEqual(TaskDeliverPayload.from_dict(VALID_DELIVER),
                         TaskDeliverPayload("echo hi", 2))
        self.assertEqual(TaskDeliverPayload.from_dict({"command": "x"}).priority, 0)
        self.assertEqual(TaskDeliverPayload.from_dict({"command": "x", "priority": -5}).priority,
                         -5)

    def test_unknown_keys_ignored(self) -> None:
        """Keys a Go-era control plane never sends (env, timeout) are ignored, not refused."""
        document = {"command": "x", "env": {"A": "1"}, "timeout": "5s", "args": None}
        self.assertEqual(TaskDeliverPayload.from_dict(document), TaskDeliverPayload("x"))

    def test_builder_and_round_trip(self) -> None:
        """deliver_payload writes both keys; from_dict(to_dict(x)) == x."""
        self.assertEqual(deliver_payload("echo hi", 2), VALID_DELIVER)
        self.assertEqual(deliver_payload("x"), {"command": "x", "priority": 0})
        payload = TaskDeliverPayload("a | b", -1)
        self.assertEqual(TaskDeliverPayload.from_dict(payload.to_dict()), payload)
        self.assertRaises(ProtocolError, deliver_payload, "")
        self.assertRaises(ProtocolError, deliver_payload, "x", True)

    def test_empty_payloads(self) -> None:
        """task.received / task.started: an object, unknown keys ignored; nothing else."""
        check_empty_payload({})
        check_empty_payload({"x_future": [1]})
        for value in (None, [], "", 0):
            error = self.assertRaises(ProtocolError, check_empty_payload, value)
            self.assertEqual((error.code, error.field), (INVALID, "payload"))


class AckAndErrorTests(SynchronousTestCase):
    """ack's highest_output_sequence and error's highest_accepted_sequence (§7.5)."""

    def test_ack_fields(self) -> None:
        """The cumulative ack's fields are read."""
        ack = AckPayload.from_dict({"acked_message_id": "m", "acked_type": TASK_OUTPUT,
                                    "task_id": "t", "execution_attempt_id": "a",
                                    "highest_output_sequence": 7})
        self.assertEqual(ack, AckPayload("m", TASK_OUTPUT, "t", "a", 7))

    def test_error_highest_accepted(self) -> None:
        """highest_accepted_sequence: absent is None, 0 is kept, the builder writes it."""
        self.assertEqual(ErrorPayload.from_dict(VALID_ERROR),
                         ErrorPayload("output_sequence_gap", "expected 4", True, "msg-x", 3))
        self.assertIsNone(ErrorPayload.from_dict(mutated(
            VALID_ERROR, ("highest_accepted_sequence",), DROP)).highest_accepted_sequence)
        self.assertEqual(ErrorPayload.from_dict(mutated(
            VALID_ERROR, ("highest_accepted_sequence",), 0)).highest_accepted_sequence, 0)
        self.assertEqual(error_payload("output_sequence_gap", "expected 4", True, "msg-x", 3),
                         VALID_ERROR)
        self.assertNotIn("highest_accepted_sequence", error_payload("c", "m", True))
        self.assertRaises(ProtocolError, error_payload, "c", "m", True, "r", True)
        error = ErrorPayload("c", "m", False, "", 0)
        self.assertEqual(ErrorPayload.from_dict(error.to_dict()), error)


class OutputTests(SynchronousTestCase):
    """task.output (§7.4): the payload built from a process's raw bytes."""

    def test_payload(self) -> None:
        """byte_count counts raw bytes; truncated_locally only when true."""
        self.assertEqual(output_payload("stdout", "é\n".encode()),
                         {"stream": "stdout", "data": "é\n", "byte_count": 3})
        self.assertEqual(output_payload("stderr", b"", True),
                         {"stream": "stderr", "data": "", "byte_count": 0,
                          "truncated_locally": True})
        self.assertEqual(output_payload("stdout", bytearray(b"ab"))["byte_count"], 2)

    def test_refusals(self) -> None:
        """A stream other than stdout/stderr, or text instead of bytes, is refused."""
        error = self.assertRaises(ProtocolError, output_payload, "final", b"x")
        self.assertEqual(error.field, "payload.stream")
        error = self.assertRaises(ProtocolError, output_payload, "stdout", "text")
        self.assertEqual(error.code, errors.INVALID_ARGUMENT)

    # Invalid bytes as Go's encoding/json writes them: one U+FFFD per byte that
    # utf8.DecodeRune cannot start a character with (Python's "replace" differs
    # on truncated sequences: one U+FFFD for the whole prefix).
    GO_REPLACEMENTS = [
        (b"plain", "plain"),
        ("é😀".encode(), "é😀"),
        (b"\xff", "\ufffd"),
        (b"a\xfeb", "a\ufffdb"),
        (b"\xe2\x82", "\ufffd\ufffd"),  # truncated 3-byte at the end of a chunk
        (b"\xe2\x82A", "\ufffd\ufffdA"),
        (b"\xf0\x9f\x98", "\ufffd" * 3),  # truncated 4-byte
        (b"\xed\xa0\x80", "\ufffd" * 3),  # an encoded surrogate
        (b"\xc0\xaf", "\ufffd" * 2),  # overlong
        (b"\xf4\x90\x80\x80", "\ufffd" * 4),  # beyond U+10FFFF
        (b"\x80\x80", "\ufffd" * 2),  # lone continuations
        (b"\x00\x1b[0m", "\x00\x1b[0m"),  # control characters are text
    ]

    def test_go_replacement(self) -> None:
        """decode_output replaces invalid UTF-8 byte by byte, as the Go agent's encoder."""
        for raw, text in self.GO_REPLACEMENTS:
            self.assertEqual(decode_output(raw), text, raw)
            self.assertEqual(output_payload("stdout", raw)["byte_count"], len(raw))

    @FUZZ
    @given(st.binary(max_size=64))
    def test_go_replacement_any_bytes(self, raw: bytes) -> None:
        """For any bytes, decode_output agrees with a transcription of Go's DecodeRune loop."""
        self.assertEqual(decode_output(raw), _go_json_text(raw))


def _go_json_text(raw: bytes) -> str:
    """Go's ``utf8.DecodeRune`` loop as ``encoding/json`` runs it, written independently."""
    # First byte → (length, lowest and highest allowed second byte), per Go's acceptRanges.
    out: list[str] = []
    i = 0
    while i < len(raw):
        first = raw[i]
        if first < 0x80:
            out.append(chr(first))
            i += 1
            continue
        if 0xC2 <= first <= 0xDF:
            size, low, high = 2, 0x80, 0xBF
        elif first == 0xE0:
            size, low, high = 3, 0xA0, 0xBF
        elif first == 0xED:
            size, low, high = 3, 0x80, 0x9F
        elif 0xE1 <= first <= 0xEF:
            size, low, high = 3, 0x80, 0xBF
        elif first == 0xF0:
            size, low, high = 4, 0x90, 0xBF
        elif first == 0xF4:
            size, low, high = 4, 0x80, 0x8F
        elif 0xF1 <= first <= 0xF3:
            size, low, high = 4, 0x80, 0xBF
        else:
            out.append("\ufffd")
            i += 1
            continue
        tail = raw[i + 1:i + size]
        if (len(tail) == size - 1 and low <= tail[0] <= high
                and all(0x80 <= byte <= 0xBF for byte in tail[1:])):
            out.append(raw[i:i + size].decode("utf-8"))
            i += size
        else:
            out.append("\ufffd")
            i += 1
    return "".join(out)


class FinalTests(SynchronousTestCase):
    """task.final (§7.4, §8.5, §8.8)."""

    def test_built_final_has_both_flags(self) -> None:
        """What we build always carries output_truncated and error_truncated."""
        self.assertEqual(final_payload("completed", 0),
                         {"status": "completed", "exit_code": 0,
                          "output_truncated": False, "error_truncated": False})
        self.assertEqual(final_payload("failed", 2, "o", "e", True, False),
                         {"status": "failed", "exit_code": 2, "output": "o", "error": "e",
                          "output_truncated": True, "error_truncated": False})
        self.assertEqual(TaskFinalPayload("failed", 1).to_dict()["error_truncated"], False)

    def test_interrupted(self) -> None:
        """The synthetic final: interrupted, exit code -1, the flags, no texts [wire]."""
        self.assertEqual(NO_EXIT_CODE, -1)
        self.assertEqual(interrupted_final_payload(),
                         {"status": "interrupted", "exit_code": -1,
                          "output_truncated": False, "error_truncated": False})
        self.assertTrue(interrupted_final_payload(error_truncated=True)["error_truncated"])

    def test_lenient_parse(self) -> None:
        """The Go runner's final (no flags, empty texts) parses; flags read false."""
        go_final = {"error": "", "exit_code": 0, "output": "", "status": "completed"}
        self.assertEqual(TaskFinalPayload.from_dict(go_final), TaskFinalPayload("completed", 0))

    def test_builder_refusals(self) -> None:
        """final_payload refuses an unknown status and non-integer exit codes."""
        self.assertRaises(ProtocolError, final_payload, "running", 0)
        self.assertRaises(ProtocolError, final_payload, "failed", True)
        self.assertRaises(ProtocolError, final_payload, "failed", 2**63)
        self.assertRaises(ProtocolError, final_payload, "failed", 1, output_truncated=1)


class MessageIdTests(SynchronousTestCase):
    """§7.6: the interrupted final's id, and the Go agent's form for the others."""

    INTERRUPTED = [
        (("task_1", "attempt_1"), "local-interrupted-task_1-attempt_1"),
        (("tasks/42", "a 1"), "local-interrupted-tasks-42-a-1"),
        (("a|b", "c|d"), "local-interrupted-a-b-c-d"),
        (("/ |", "| /"), "local-interrupted-" + "-" * 7),
        (("t--1", "-"), "local-interrupted-t--1--"),
        (("tâche", "é"), "local-interrupted-tâche-é"),
        # Only those three characters: tabs, backslashes, dots and colons stay.
        (("t\t1", "a\\b.c:d"), "local-interrupted-t\t1-a\\b.c:d"),
        (("550e8400-e29b-41d4-a716-446655440000", "1"),
         "local-interrupted-550e8400-e29b-41d4-a716-446655440000-1"),
    ]

    def test_interrupted_ids(self) -> None:
        """local-interrupted-<task>-<attempt>, with '/', ' ' and '|' replaced by '-'."""
        for (task_id, attempt_id), expected in self.INTERRUPTED:
            self.assertEqual(interrupted_final_message_id(task_id, attempt_id), expected)

    def test_interrupted_id_is_deterministic(self) -> None:
        """The same attempt always gets the same id (recovery is idempotent)."""
        self.assertEqual(interrupted_final_message_id("t/1", "a"),
                         interrupted_final_message_id("t/1", "a"))

    def test_interrupted_id_refusals(self) -> None:
        """Empty or non-string ids are a programming error, not a malformed id."""
        for args in (("", "a"), ("t", ""), (None, "a"), ("t", 1)):
            error = self.assertRaises(ProtocolError, interrupted_final_message_id, *args)
            self.assertEqual(error.code, errors.INVALID_ARGUMENT)

    def test_task_message_ids(self) -> None:
        """msg-<task>-<attempt>-<stream|final>-<sequence>-<ns>, sanitised as the Go agent."""
        self.assertEqual(task_message_id("t/1", "a 1", "stdout", 3, 1745000000000000000),
                         "msg-t-1-a-1-stdout-3-1745000000000000000")
        self.assertEqual(task_message_id("t", "a|b", "final", 0, 7), "msg-t-a-b-final-0-7")
        self.assertRaises(ProtocolError, task_message_id, "t", "a", "stdout", True, 1)
        self.assertRaises(ProtocolError, task_message_id, "t", "a", "", 1, 1)


class DispatchTests(SynchronousTestCase):
    """phase2_payload, and the phase-1 envelope rules left as they were."""

    def _envelope(self, type_: str, payload: dict[str, Any]) -> Envelope:
        task = type_ in TASK_TYPES
        envelope = make_envelope(type_, AGENT, payload, now=0, task_id="t" if task else "",
                                 execution_attempt_id="a" if task else "",
                                 sequence=1 if type_ == TASK_OUTPUT else None)
        return parse_envelope(envelope.to_json(), AGENT)

    def test_each_type(self) -> None:
        """Each type's payload comes back typed, through real JSON and the frozen payload."""
        cases: dict[str, tuple[dict[str, Any], Any]] = {
            AGENT_HELLO: (VALID_HELLO, _snapshot()),
            AGENT_HELLO_ACK: (VALID_HELLO_ACK, HelloAckDirectives.from_dict(VALID_HELLO_ACK)),
            TASK_DELIVER: (VALID_DELIVER, TaskDeliverPayload("echo hi", 2)),
            TASK_RECEIVED: ({}, None),
            TASK_STARTED: ({}, None),
            TASK_LEASE_HEARTBEAT: ({}, None),
            TASK_OUTPUT: (output_payload("stdout", b"x"), TaskOutputPayload("stdout", "x", 1)),
            TASK_FINAL: (interrupted_final_payload(), TaskFinalPayload("interrupted", -1)),
            ACK: ({"acked_message_id": "m", "acked_type": TASK_FINAL},
                  AckPayload("m", TASK_FINAL)),
            ERROR: (VALID_ERROR, ErrorPayload.from_dict(VALID_ERROR)),
        }
        self.assertEqual(set(cases), MESSAGE_TYPES)
        for type_, (payload, expected) in cases.items():
            self.assertEqual(phase2_payload(self._envelope(type_, payload)), expected, type_)

    def test_phase1_envelope_rules_unchanged(self) -> None:
        """validate() still takes a phase-1 hello ({}) and any deliver payload; phase2 refuses."""
        for type_ in (AGENT_HELLO, TASK_DELIVER):
            envelope = self._envelope(type_, {})
            error = self.assertRaises(ProtocolError, phase2_payload, envelope)
            self.assertEqual(error.code, INVALID)


# --- hypothesis -----------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans()
                | st.integers(min_value=-(2**64), max_value=2**64) | st.text(max_size=12)
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)


def _all_paths(value: Any, prefix: Path = ()) -> list[Path]:
    """Every key and index path inside a document."""
    paths: list[Path] = []
    items = (value.items() if isinstance(value, dict)
             else enumerate(value) if isinstance(value, list) else ())
    for key, child in items:
        paths.append((*prefix, key))
        paths.extend(_all_paths(child, (*prefix, key)))
    return paths


def _parse_or_refuse(parse: Callable[[Any], Any], document: Any) -> None:
    """Parse; a refusal must be a ProtocolError naming a payload path; a success round-trips."""
    try:
        parsed = parse(document)
    except ProtocolError as error:
        assert error.code in (INVALID, RANGE), error.code
        assert error.field.startswith("payload"), error.field
        str(error)
        return
    assert type(parsed).from_dict(parsed.to_dict()) == parsed


class FuzzTests(SynchronousTestCase):
    """Hypothesis: whatever arrives, from_dict raises only ProtocolError or returns a value."""

    @FUZZ
    @given(st.sampled_from(sorted(PARSERS)), json_values)
    def test_arbitrary_json(self, kind: str, document: Any) -> None:
        """Any JSON value at all."""
        _parse_or_refuse(PARSERS[kind][0], document)

    @FUZZ
    @given(st.sampled_from(sorted(PARSERS)), st.data())
    def test_mutated_valid_documents(self, kind: str, data: st.DataObject) -> None:
        """A valid document with one to three fields replaced by any JSON value, or deleted."""
        parse, document = PARSERS[kind]
        document = copy.deepcopy(document)
        for _ in range(data.draw(st.integers(1, 3))):
            paths = _all_paths(document)
            if not paths:
                break
            path = data.draw(st.sampled_from(paths))
            document = mutated(document, path, data.draw(st.just(DROP) | json_values))
        _parse_or_refuse(parse, document)


ids = st.text(min_size=1, max_size=12)
times = st.integers(min_value=-62135596800, max_value=253402300799).map(format_sent_at)
counts = st.integers(min_value=0, max_value=2**63 - 1)
streams = st.sampled_from(["stdout", "stderr"])


@st.composite
def unacked_outputs(draw: st.DrawFn) -> UnackedOutput:
    first, last = sorted(draw(st.lists(st.integers(1, 2**63 - 1), min_size=2, max_size=2)))
    return UnackedOutput(draw(ids), draw(ids), draw(streams), first, last, draw(st.booleans()))


finals = st.builds(TaskFinalPayload, st.sampled_from(["completed", "failed", "interrupted"]),
                   st.integers(-(2**63), 2**63 - 1), st.text(max_size=20),
                   st.text(max_size=20), st.booleans(), st.booleans())
snapshots = st.builds(
    HelloSnapshot,
    capabilities=st.builds(Capabilities, st.booleans(), st.booleans()),
    client_version=ids,
    running_task=st.none() | st.builds(RunningTask, ids, ids, times,
                                       st.builds(StreamSequences, counts, counts)),
    received_not_started=st.lists(st.builds(ReceivedAttempt, ids, ids, times), max_size=3),
    unacked_finals=st.lists(st.builds(UnackedFinal, ids, ids, ids, finals), max_size=3),
    unacked_output=st.lists(unacked_outputs(), max_size=3),
    spool_status=st.builds(SpoolStatus, counts, counts, st.booleans()),
)
directives = st.builds(
    HelloAckDirectives, st.text(), st.text(), st.lists(st.text(), max_size=3),
    st.lists(st.builds(DiscardedAttempt, ids, ids, st.text(max_size=8)), max_size=3),
    st.lists(st.builds(OutputReplay, ids, ids, streams, st.integers(1, 2**63 - 1)),
             max_size=3),
    st.booleans(),
)


class RoundTripTests(SynchronousTestCase):
    """Hypothesis: valid payloads survive to_dict / JSON / from_dict unchanged."""

    @FUZZ
    @given(snapshots)
    def test_snapshot(self, snapshot: HelloSnapshot) -> None:
        """from_dict(to_dict(x)) == x, through an envelope's JSON too."""
        payload = hello_payload(snapshot)
        self.assertEqual(HelloSnapshot.from_dict(payload), snapshot)
        envelope = make_envelope(AGENT_HELLO, AGENT, payload, now=0)
        self.assertEqual(phase2_payload(parse_envelope(envelope.to_json(), AGENT)), snapshot)

    @FUZZ
    @given(directives)
    def test_directives(self, value: HelloAckDirectives) -> None:
        """from_dict(to_dict(x)) == x, through an envelope's JSON too."""
        payload = hello_ack_payload(value)
        self.assertEqual(HelloAckDirectives.from_dict(payload), value)
        envelope = make_envelope(AGENT_HELLO_ACK, AGENT, payload, now=0)
        self.assertEqual(phase2_payload(parse_envelope(envelope.to_json(), AGENT)), value)

    @FUZZ
    @given(st.text(min_size=1), st.integers(-(2**63), 2**63 - 1))
    def test_deliver(self, command: str, priority: int) -> None:
        """from_dict(to_dict(x)) == x."""
        value = TaskDeliverPayload(command, priority)
        self.assertEqual(TaskDeliverPayload.from_dict(deliver_payload(command, priority)), value)
