"""Tests for hostlink_tw.protocol: envelopes, payloads, parsing of hostile frames, trackers.

The rule tables generate one test method per row, so each rule of PROTOCOL §5
has its own named test, failing on its own if the rule is dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import operator
import re
import time
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw import protocol as p
from hostlink_tw.protocol import (
    ACK,
    AGENT_HELLO,
    AGENT_HELLO_ACK,
    AGENT_ID_MAX_LENGTH,
    AGENT_ID_RULE,
    ERROR,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    TASK_DELIVER,
    TASK_FINAL,
    TASK_LEASE_HEARTBEAT,
    TASK_OUTPUT,
    TASK_RECEIVED,
    TASK_STARTED,
    TASK_TYPES,
    AckPayload,
    DuplicateTracker,
    Envelope,
    ErrorPayload,
    MessageIdGenerator,
    OutputSequenceTracker,
    ProtocolError,
    SequenceVerdict,
    TaskFinalPayload,
    TaskOutputPayload,
    ack_payload,
    agent_id_problem,
    error_payload,
    format_sent_at,
    make_envelope,
    new_message_id,
    parse_envelope,
    parse_sent_at,
    typed_payload,
)
from hostlink_tw.wire import jsontext

AGENT = "agent-1"
SENT_AT = "2026-04-27T11:03:00Z"
# 2026-04-27T11:03:00Z as a Unix time.
SENT_AT_UNIX = 1777287780

# Modest budget: the whole project suite must stay fast on 2 cores.
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

VALID_PAYLOADS: dict[str, dict[str, Any]] = {
    ACK: {"acked_message_id": "msg_1", "acked_type": TASK_OUTPUT},
    AGENT_HELLO_ACK: {"acked_message_id": "msg_1", "acked_type": AGENT_HELLO},
    ERROR: {"code": "bad", "message": "it broke", "retryable": False},
    TASK_OUTPUT: {"stream": "stdout", "data": "hi\n", "byte_count": 3},
    TASK_FINAL: {"status": "completed", "exit_code": 0},
}


def valid_doc(type_: str = ACK) -> dict[str, Any]:
    """Return a valid envelope of *type_* as a JSON-ready dict."""
    doc: dict[str, Any] = {
        "protocol_version": 1,
        "message_id": "msg_1777287780000000000",
        "type": type_,
        "agent_id": AGENT,
        "sent_at": SENT_AT,
        "payload": copy.deepcopy(VALID_PAYLOADS.get(type_, {})),
    }
    if type_ in TASK_TYPES:
        doc["task_id"] = "task_1"
        doc["execution_attempt_id"] = "attempt_1"
    if type_ == TASK_OUTPUT:
        doc["sequence"] = 1
    return doc


def dumps(doc: object) -> str:
    """Serialise a test document compactly (allowing NaN so tests can smuggle it in)."""
    return json.dumps(doc, separators=(",", ":"))


Mutation = Callable[[dict[str, Any]], None]


def put(path: str, value: Any) -> Mutation:
    """Return a mutation setting dotted *path* (``payload.stream``) to *value*."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = doc
        for name in parents:
            target = target[name]
        target[last] = value

    return mutate


def drop(path: str) -> Mutation:
    """Return a mutation deleting dotted *path*."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = doc
        for name in parents:
            target = target[name]
        del target[last]

    return mutate


def _method_name(text: str) -> str:
    return "test_" + re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_")


# --- rule tables --------------------------------------------------------------

# (name, message type, mutation of a valid document, expected code, expected field)
ENVELOPE_RULES: list[tuple[str, str, Mutation, str, str]] = [
    # protocol_version: the integer 1
    ("version missing", ACK, drop("protocol_version"), p.MISSING_FIELD, "protocol_version"),
    ("version true", ACK, put("protocol_version", True), p.INVALID_FIELD, "protocol_version"),
    ("version false", ACK, put("protocol_version", False), p.INVALID_FIELD, "protocol_version"),
    ("version float", ACK, put("protocol_version", 1.0), p.INVALID_FIELD, "protocol_version"),
    ("version string", ACK, put("protocol_version", "1"), p.INVALID_FIELD, "protocol_version"),
    ("version null", ACK, put("protocol_version", None), p.INVALID_FIELD, "protocol_version"),
    ("version 2", ACK, put("protocol_version", 2), p.UNSUPPORTED_PROTOCOL_VERSION,
     "protocol_version"),
    ("version 0", ACK, put("protocol_version", 0), p.UNSUPPORTED_PROTOCOL_VERSION,
     "protocol_version"),
    ("version beyond int64", ACK, put("protocol_version", 2**64), p.NUMBER_OUT_OF_RANGE,
     "protocol_version"),
    # message_id: non-empty string
    ("message_id missing", ACK, drop("message_id"), p.MISSING_FIELD, "message_id"),
    ("message_id empty", ACK, put("message_id", ""), p.MISSING_FIELD, "message_id"),
    ("message_id number", ACK, put("message_id", 7), p.INVALID_FIELD, "message_id"),
    ("message_id null", ACK, put("message_id", None), p.INVALID_FIELD, "message_id"),
    # type: known
    ("type missing", ACK, drop("type"), p.MISSING_FIELD, "type"),
    ("type unknown", ACK, put("type", "task.bogus"), p.UNKNOWN_TYPE, "type"),
    ("type wrong case", ACK, put("type", "ACK"), p.UNKNOWN_TYPE, "type"),
    ("type array", ACK, put("type", ["ack"]), p.INVALID_FIELD, "type"),
    # agent_id: non-empty and the authenticated one
    ("agent_id missing", ACK, drop("agent_id"), p.MISSING_FIELD, "agent_id"),
    ("agent_id empty", ACK, put("agent_id", ""), p.MISSING_FIELD, "agent_id"),
    ("agent_id other", ACK, put("agent_id", "agent-2"), p.AGENT_ID_MISMATCH, "agent_id"),
    ("agent_id other case", ACK, put("agent_id", "Agent-1"), p.AGENT_ID_MISMATCH, "agent_id"),
    ("agent_id number", ACK, put("agent_id", 1), p.INVALID_FIELD, "agent_id"),
    # task_id / execution_attempt_id: strings
    ("task_id number on ack", ACK, put("task_id", 1), p.INVALID_FIELD, "task_id"),
    ("attempt null on ack", ACK, put("execution_attempt_id", None), p.INVALID_FIELD,
     "execution_attempt_id"),
    # sequence: int (not bool), required for task.output
    ("sequence missing on output", TASK_OUTPUT, drop("sequence"), p.MISSING_FIELD, "sequence"),
    ("sequence true", TASK_OUTPUT, put("sequence", True), p.INVALID_FIELD, "sequence"),
    ("sequence float", TASK_OUTPUT, put("sequence", 1.0), p.INVALID_FIELD, "sequence"),
    ("sequence string", TASK_OUTPUT, put("sequence", "1"), p.INVALID_FIELD, "sequence"),
    ("sequence null", TASK_OUTPUT, put("sequence", None), p.INVALID_FIELD, "sequence"),
    ("sequence beyond int64", TASK_OUTPUT, put("sequence", 2**63), p.NUMBER_OUT_OF_RANGE,
     "sequence"),
    ("sequence bool on ack", ACK, put("sequence", False), p.INVALID_FIELD, "sequence"),
    # sent_at: non-empty RFC 3339 UTC whole seconds
    ("sent_at missing", ACK, drop("sent_at"), p.MISSING_FIELD, "sent_at"),
    ("sent_at empty", ACK, put("sent_at", ""), p.MISSING_FIELD, "sent_at"),
    ("sent_at number", ACK, put("sent_at", SENT_AT_UNIX), p.INVALID_FIELD, "sent_at"),
    # payload: an object
    ("payload missing", AGENT_HELLO, drop("payload"), p.MISSING_FIELD, "payload"),
    ("payload null", AGENT_HELLO, put("payload", None), p.INVALID_FIELD, "payload"),
    ("payload array", AGENT_HELLO, put("payload", []), p.INVALID_FIELD, "payload"),
    ("payload string", AGENT_HELLO, put("payload", "{}"), p.INVALID_FIELD, "payload"),
]

for _type in sorted(TASK_TYPES):
    for _field in ("task_id", "execution_attempt_id"):
        ENVELOPE_RULES += [
            (f"{_field} missing on {_type}", _type, drop(_field), p.MISSING_FIELD, _field),
            (f"{_field} empty on {_type}", _type, put(_field, ""), p.MISSING_FIELD, _field),
            (f"{_field} number on {_type}", _type, put(_field, 5), p.INVALID_FIELD, _field),
        ]

BAD_SENT_AT = [
    "2026-04-27T11:03:00.5Z",  # fraction
    "2026-04-27T11:03:00.000Z",
    "2026-04-27T11:03:00+00:00",  # offset instead of Z
    "2026-04-27T13:03:00+02:00",
    "2026-04-27T11:03Z",  # no seconds
    "2026-04-27 11:03:00Z",  # space separator
    "2026-04-27t11:03:00Z",  # lower-case t
    "2026-04-27T11:03:00z",  # lower-case z
    "2026-04-27T11:03:00",  # no zone
    "2026-04-27T11:03:00Z\n",  # trailing newline ($ would accept it)
    " 2026-04-27T11:03:00Z",
    "2026-4-27T11:03:00Z",
    "\uff12\uff10\uff12\uff16-04-27T11:03:00Z",  # full-width digits match \d
    "2026-02-30T00:00:00Z",  # no such day
    "2025-02-29T00:00:00Z",  # not a leap year
    "2026-13-01T00:00:00Z",
    "2026-00-10T00:00:00Z",
    "2026-04-27T24:00:00Z",
    "2026-04-27T11:60:00Z",
    "2026-04-27T11:03:60Z",  # leap second: Go's parser refuses it too
    "0000-01-01T00:00:00Z",
    "Mon, 27 Apr 2026 11:03:00 GMT",
]
for _bad in BAD_SENT_AT:
    ENVELOPE_RULES.append((f"sent_at {_bad!r}", ACK, put("sent_at", _bad), p.INVALID_FIELD,
                           "sent_at"))

GOOD_SENT_AT = [SENT_AT, "2024-02-29T23:59:59Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z",
                "2000-02-29T00:00:00Z", "1970-01-01T00:00:00Z"]

# (name, type, payload mutation, expected code, expected field)
PAYLOAD_RULES: list[tuple[str, str, Mutation, str, str]] = []
for _ack_type in (ACK, AGENT_HELLO_ACK):
    PAYLOAD_RULES += [
        (f"{_ack_type} acked_message_id missing", _ack_type, drop("payload.acked_message_id"),
         p.INVALID_PAYLOAD, "payload.acked_message_id"),
        (f"{_ack_type} acked_message_id number", _ack_type, put("payload.acked_message_id", 1),
         p.INVALID_PAYLOAD, "payload.acked_message_id"),
        (f"{_ack_type} acked_type missing", _ack_type, drop("payload.acked_type"),
         p.INVALID_PAYLOAD, "payload.acked_type"),
        (f"{_ack_type} acked_type null", _ack_type, put("payload.acked_type", None),
         p.INVALID_PAYLOAD, "payload.acked_type"),
        (f"{_ack_type} task_id number", _ack_type, put("payload.task_id", 3),
         p.INVALID_PAYLOAD, "payload.task_id"),
        (f"{_ack_type} attempt bool", _ack_type, put("payload.execution_attempt_id", True),
         p.INVALID_PAYLOAD, "payload.execution_attempt_id"),
        (f"{_ack_type} highest true", _ack_type, put("payload.highest_output_sequence", True),
         p.INVALID_PAYLOAD, "payload.highest_output_sequence"),
        (f"{_ack_type} highest float", _ack_type, put("payload.highest_output_sequence", 3.0),
         p.INVALID_PAYLOAD, "payload.highest_output_sequence"),
        (f"{_ack_type} highest string", _ack_type, put("payload.highest_output_sequence", "3"),
         p.INVALID_PAYLOAD, "payload.highest_output_sequence"),
        (f"{_ack_type} highest beyond int64", _ack_type,
         put("payload.highest_output_sequence", -(2**63) - 1), p.NUMBER_OUT_OF_RANGE,
         "payload.highest_output_sequence"),
    ]
PAYLOAD_RULES += [
    ("error code missing", ERROR, drop("payload.code"), p.INVALID_PAYLOAD, "payload.code"),
    ("error code number", ERROR, put("payload.code", 500), p.INVALID_PAYLOAD, "payload.code"),
    ("error message missing", ERROR, drop("payload.message"), p.INVALID_PAYLOAD,
     "payload.message"),
    ("error message list", ERROR, put("payload.message", ["x"]), p.INVALID_PAYLOAD,
     "payload.message"),
    ("error retryable missing", ERROR, drop("payload.retryable"), p.INVALID_PAYLOAD,
     "payload.retryable"),
    ("error retryable string", ERROR, put("payload.retryable", "true"), p.INVALID_PAYLOAD,
     "payload.retryable"),
    ("error retryable int", ERROR, put("payload.retryable", 1), p.INVALID_PAYLOAD,
     "payload.retryable"),
    ("error related number", ERROR, put("payload.related_message_id", 9), p.INVALID_PAYLOAD,
     "payload.related_message_id"),
    ("output stream missing", TASK_OUTPUT, drop("payload.stream"), p.INVALID_PAYLOAD,
     "payload.stream"),
    ("output stream stdin", TASK_OUTPUT, put("payload.stream", "stdin"), p.INVALID_PAYLOAD,
     "payload.stream"),
    ("output stream upper", TASK_OUTPUT, put("payload.stream", "STDOUT"), p.INVALID_PAYLOAD,
     "payload.stream"),
    ("output stream number", TASK_OUTPUT, put("payload.stream", 1), p.INVALID_PAYLOAD,
     "payload.stream"),
    ("output data missing", TASK_OUTPUT, drop("payload.data"), p.INVALID_PAYLOAD,
     "payload.data"),
    ("output data number", TASK_OUTPUT, put("payload.data", 3), p.INVALID_PAYLOAD,
     "payload.data"),
    ("output byte_count missing", TASK_OUTPUT, drop("payload.byte_count"), p.INVALID_PAYLOAD,
     "payload.byte_count"),
    ("output byte_count negative", TASK_OUTPUT, put("payload.byte_count", -1),
     p.INVALID_PAYLOAD, "payload.byte_count"),
    ("output byte_count float", TASK_OUTPUT, put("payload.byte_count", 3.0), p.INVALID_PAYLOAD,
     "payload.byte_count"),
    ("output byte_count true", TASK_OUTPUT, put("payload.byte_count", True), p.INVALID_PAYLOAD,
     "payload.byte_count"),
    ("output truncated_locally int", TASK_OUTPUT, put("payload.truncated_locally", 1),
     p.INVALID_PAYLOAD, "payload.truncated_locally"),
    ("output truncated_locally null", TASK_OUTPUT, put("payload.truncated_locally", None),
     p.INVALID_PAYLOAD, "payload.truncated_locally"),
    ("final status missing", TASK_FINAL, drop("payload.status"), p.INVALID_PAYLOAD,
     "payload.status"),
    ("final status unknown", TASK_FINAL, put("payload.status", "done"), p.INVALID_PAYLOAD,
     "payload.status"),
    ("final exit_code missing", TASK_FINAL, drop("payload.exit_code"), p.INVALID_PAYLOAD,
     "payload.exit_code"),
    ("final exit_code float", TASK_FINAL, put("payload.exit_code", 1.5), p.INVALID_PAYLOAD,
     "payload.exit_code"),
    ("final exit_code false", TASK_FINAL, put("payload.exit_code", False), p.INVALID_PAYLOAD,
     "payload.exit_code"),
    ("final exit_code string", TASK_FINAL, put("payload.exit_code", "0"), p.INVALID_PAYLOAD,
     "payload.exit_code"),
    ("final output number", TASK_FINAL, put("payload.output", 1), p.INVALID_PAYLOAD,
     "payload.output"),
    ("final error null", TASK_FINAL, put("payload.error", None), p.INVALID_PAYLOAD,
     "payload.error"),
    ("final output_truncated int", TASK_FINAL, put("payload.output_truncated", 0),
     p.INVALID_PAYLOAD, "payload.output_truncated"),
    ("final error_truncated string", TASK_FINAL, put("payload.error_truncated", "false"),
     p.INVALID_PAYLOAD, "payload.error_truncated"),
]

# (name, raw frame, expected code): what goes wrong before any field is looked at.
FRAME_RULES: list[tuple[str, str | bytes, str]] = [
    ("invalid utf8 byte", b'{"a":"\xff"}', p.INVALID_UTF8),
    ("overlong utf8", b'{"a":"\xc0\xaf"}', p.INVALID_UTF8),
    ("utf8 surrogate bytes", b'{"a":"\xed\xa0\x80"}', p.INVALID_UTF8),
    ("truncated utf8", b'{"a":"\xe2\x82', p.INVALID_UTF8),
    ("latin1 text", '{"a":"café"}'.encode("latin-1"), p.INVALID_UTF8),
    ("lone surrogate escape", '{"a":"\\ud800"}', p.INVALID_UTF8),
    ("lone surrogate escape in key", '{"\\uDC00":1}', p.INVALID_UTF8),
    ("lone surrogate in text", '{"a":"\ud800"}', p.INVALID_UTF8),
    ("empty", "", p.INVALID_JSON),
    ("empty bytes", b"", p.INVALID_JSON),
    ("whitespace", " \n", p.INVALID_JSON),
    ("garbage", "hello", p.INVALID_JSON),
    ("trailing garbage", "{}x", p.INVALID_JSON),
    ("two objects", "{}{}", p.INVALID_JSON),
    ("utf8 bom", "\ufeff{}", p.INVALID_JSON),
    ("utf8 bom bytes", b"\xef\xbb\xbf{}", p.INVALID_JSON),
    ("single quotes", "{'a':1}", p.INVALID_JSON),
    ("trailing comma", '{"a":1,}', p.INVALID_JSON),
    ("raw control character", '{"a":"x\ny"}', p.INVALID_JSON),
    ("unterminated string", '{"a":"\\"\\"', p.INVALID_JSON),
    ("NaN", '{"a":NaN}', p.INVALID_JSON),
    ("Infinity", '{"a":Infinity}', p.INVALID_JSON),
    ("minus Infinity", '{"a":-Infinity}', p.INVALID_JSON),
    ("float overflow", '{"a":1e999}', p.NUMBER_OUT_OF_RANGE),
    ("10000 digit int", '{"a":' + "9" * 10000 + "}", p.NUMBER_OUT_OF_RANGE),
    ("10000 digit version", '{"protocol_version":' + "1" * 10000 + "}", p.NUMBER_OUT_OF_RANGE),
    ("duplicate top key", '{"type":"ack","type":"error"}', p.DUPLICATE_KEY),
    ("duplicate same value", '{"a":1,"a":1}', p.DUPLICATE_KEY),
    ("duplicate nested key", '{"payload":{"stream":"stdout","stream":"stderr"}}',
     p.DUPLICATE_KEY),
    ("deep arrays", "[" * 100_000 + "]" * 100_000, p.NESTING_TOO_DEEP),
    ("deep objects", '{"a":' * 100_000 + "1" + "}" * 100_000, p.NESTING_TOO_DEEP),
    ("deep unclosed", "[" * 100_000, p.NESTING_TOO_DEEP),
    ("deep in payload", '{"payload":' + "[" * 65 + "]" * 65 + "}", p.NESTING_TOO_DEEP),
    ("array", "[]", p.NOT_OBJECT),
    ("string", '"x"', p.NOT_OBJECT),
    ("number", "1", p.NOT_OBJECT),
    ("null", "null", p.NOT_OBJECT),
    ("true", "true", p.NOT_OBJECT),
]


def _envelope_rule_test(type_: str, mutation: Mutation, code: str, field: str) -> Any:
    def test(self: ProtocolRuleTests) -> None:
        doc = valid_doc(type_)
        parse_envelope(dumps(doc), AGENT)  # the unmutated document is valid
        mutation(doc)
        error = self.assertRaises(ProtocolError, parse_envelope, dumps(doc), AGENT)
        self.assertEqual((error.code, error.field), (code, field), str(error))

    return test


def _frame_rule_test(frame: str | bytes, code: str) -> Any:
    def test(self: ProtocolRuleTests) -> None:
        error = self.assertRaises(ProtocolError, parse_envelope, frame, AGENT)
        self.assertEqual(error.code, code, str(error))

    return test


class ProtocolRuleTests(SynchronousTestCase):
    """One generated test per rule row (see ENVELOPE_RULES, PAYLOAD_RULES, FRAME_RULES)."""

    def test_valid_documents(self) -> None:
        """Every type's reference document is valid, so each rule row isolates one change."""
        for type_ in MESSAGE_TYPES:
            envelope = parse_envelope(dumps(valid_doc(type_)), AGENT)
            self.assertEqual(envelope.type, type_)

    def test_good_sent_at(self) -> None:
        """Real calendar dates in the exact agent form are accepted, leap days included."""
        for good in GOOD_SENT_AT:
            doc = valid_doc()
            doc["sent_at"] = good
            self.assertEqual(parse_envelope(dumps(doc), AGENT).sent_at, good)


for _name, _type, _mutation, _code, _field in ENVELOPE_RULES + PAYLOAD_RULES:
    _test = _envelope_rule_test(_type, _mutation, _code, _field)
    _test.__doc__ = f"Rule: {_name} -> {_code}."
    assert not hasattr(ProtocolRuleTests, _method_name(_name)), _name
    setattr(ProtocolRuleTests, _method_name(_name), _test)

for _name, _frame, _code in FRAME_RULES:
    _test = _frame_rule_test(_frame, _code)
    _test.__doc__ = f"Frame: {_name} -> {_code}."
    assert not hasattr(ProtocolRuleTests, _method_name("frame " + _name)), _name
    setattr(ProtocolRuleTests, _method_name("frame " + _name), _test)


# --- envelope behaviour ---------------------------------------------------------------


class AgentIdRuleTests(SynchronousTestCase):
    """Issues 10.9 and 10.15: the one agent-id rule."""

    def test_ids_in_use_are_accepted(self) -> None:
        # The ids of the tests, the demo, the Go agent's examples and UUIDs.
        for agent_id in (
            "a", "agt_01HX5Z", "agent-7f3a", "agent-0123456789abcdef", "demo-agent",
            "550e8400-e29b-41d4-a716-446655440000", "host.example:1@x", "x" * AGENT_ID_MAX_LENGTH,
        ):
            self.assertIsNone(agent_id_problem(agent_id), agent_id)

    def test_ids_outside_the_rule(self) -> None:
        cases = {
            "": "is empty",
            "a" * (AGENT_ID_MAX_LENGTH + 1): "has 257 characters",
            "agënt": "outside the alphabet (U+00EB)",
            "agt\ud800": "outside the alphabet (U+D800)",
            "a b": "(U+0020)",
            "a\r\nX: y": "a control character outside the alphabet (U+000D)",
            "a/b": "(U+002F)",
        }
        for value, needle in cases.items():
            problem = agent_id_problem(value)
            assert problem is not None, value
            self.assertIn(needle, problem)
            self.assertTrue(problem.endswith(AGENT_ID_RULE), problem)
            if value:
                # Never repeats the (possibly hostile) value.
                self.assertNotIn(value, problem)
        for value, kind in ((None, "null"), (7, "an integer")):
            problem = agent_id_problem(value)
            assert problem is not None
            self.assertIn(f"is {kind}, not a string", problem)

    def test_problem_text_is_ascii(self) -> None:
        # It may go into an HTTP reason and a log line whatever was sent.
        problem = agent_id_problem("\u202e\x1b[2J")
        assert problem is not None
        problem.encode("ascii")


class EnvelopeTests(SynchronousTestCase):
    """Serialisation, parsing and immutability of Envelope."""

    def test_to_json_exact(self) -> None:
        """Compact JSON, Go field order, empty task fields and absent sequence omitted."""
        envelope = Envelope(type=AGENT_HELLO, message_id="msg_1", agent_id=AGENT,
                            sent_at=SENT_AT, payload={})
        self.assertEqual(
            envelope.to_json(),
            '{"protocol_version":1,"message_id":"msg_1","type":"agent.hello",'
            '"agent_id":"agent-1","sent_at":"2026-04-27T11:03:00Z","payload":{}}',
        )

    def test_to_json_task_fields(self) -> None:
        """task_id, execution_attempt_id and sequence appear when set; sequence 0 is not absent."""
        envelope = Envelope(type=TASK_OUTPUT, message_id="m", agent_id=AGENT, sent_at=SENT_AT,
                            payload={"stream": "stdout", "data": "é", "byte_count": 2},
                            task_id="t", execution_attempt_id="a", sequence=0)
        self.assertEqual(
            envelope.to_json(),
            '{"protocol_version":1,"message_id":"m","type":"task.output","agent_id":"agent-1",'
            '"task_id":"t","execution_attempt_id":"a","sequence":0,'
            '"sent_at":"2026-04-27T11:03:00Z",'
            '"payload":{"stream":"stdout","data":"é","byte_count":2}}',
        )

    def test_payload_none_is_empty_object(self) -> None:
        """The payload is always an object on the wire."""
        envelope = Envelope(AGENT_HELLO, "m", AGENT, SENT_AT, None)  # type: ignore[arg-type]
        self.assertEqual(json.loads(envelope.to_json())["payload"], {})

    def test_to_json_does_not_validate(self) -> None:
        """Invalid envelopes can be expressed (for fault injection); validate catches them."""
        envelope = Envelope(type="bogus", message_id="", agent_id=AGENT, sent_at="x",
                            payload={}, protocol_version=True)
        self.assertEqual(json.loads(envelope.to_json())["protocol_version"], True)

    def test_to_json_unserialisable(self) -> None:
        """Values JSON or UTF-8 cannot carry raise ProtocolError, not TypeError/ValueError."""
        for payload in ({"a": float("nan")}, {"a": {1, 2}}, {"a": "\ud800"}, {"a": b"x"}):
            envelope = Envelope(AGENT_HELLO, "m", AGENT, SENT_AT, payload)
            error = self.assertRaises(ProtocolError, envelope.to_json)
            self.assertEqual(error.code, p.INVALID_ARGUMENT)

    def test_round_trip_every_type(self) -> None:
        """to_json and from_json are inverse for every type."""
        for type_ in MESSAGE_TYPES:
            envelope = Envelope.from_json(dumps(valid_doc(type_)))
            self.assertEqual(Envelope.from_json(envelope.to_json()), envelope)
            self.assertEqual(json.loads(envelope.to_json()), valid_doc(type_))

    def test_from_json_bytes(self) -> None:
        """Bytes, bytearray and memoryview frames are decoded as UTF-8."""
        text = dumps(valid_doc())
        for frame in (text.encode(), bytearray(text.encode()), memoryview(text.encode())):
            self.assertEqual(Envelope.from_json(frame), Envelope.from_json(text))  # type: ignore[arg-type]

    def test_from_json_wrong_argument_type(self) -> None:
        """Neither text nor bytes: still only ProtocolError."""
        error = self.assertRaises(ProtocolError, Envelope.from_json, 5)
        self.assertEqual(error.code, p.INVALID_ARGUMENT)

    def test_from_json_non_ascii(self) -> None:
        """Non-ASCII text survives parsing and serialising unescaped."""
        doc = valid_doc(TASK_OUTPUT)
        doc["payload"]["data"] = "héllo ✓ 𝄞"
        envelope = Envelope.from_json(json.dumps(doc, ensure_ascii=False).encode())
        self.assertEqual(envelope.payload["data"], "héllo ✓ 𝄞")
        self.assertIn("héllo ✓ 𝄞", envelope.to_json())

    def test_from_json_ignores_unknown_fields(self) -> None:
        """Unknown envelope fields are ignored, as Go's decoder does."""
        doc = valid_doc()
        doc["future_field"] = {"x": 1}
        self.assertEqual(parse_envelope(dumps(doc), AGENT), Envelope.from_json(
            dumps(valid_doc())))

    def test_from_json_checks_structure_only(self) -> None:
        """Values are validate's job: from_json accepts version 2, unknown types, empty ids."""
        doc = valid_doc()
        doc.update(protocol_version=2, type="x", agent_id="", message_id="", sent_at="y")
        envelope = Envelope.from_json(dumps(doc))
        self.assertEqual(envelope.protocol_version, 2)
        self.assertRaises(ProtocolError, envelope.validate, AGENT)

    def test_absent_fields_read_as_empty(self) -> None:
        """Absent strings parse as "" and an absent sequence as None."""
        envelope = Envelope.from_json('{"protocol_version":1,"payload":{}}')
        self.assertEqual(
            (envelope.type, envelope.message_id, envelope.task_id, envelope.sequence),
            ("", "", "", None),
        )

    def test_validate_directly_built(self) -> None:
        """validate re-checks types of envelopes built in code, not only parsed ones."""
        base = Envelope.from_json(dumps(valid_doc(TASK_OUTPUT)))
        base.validate(AGENT)
        cases: list[tuple[dict[str, Any], str]] = [
            ({"protocol_version": True}, p.INVALID_FIELD),
            ({"protocol_version": 1.0}, p.INVALID_FIELD),
            ({"message_id": None}, p.INVALID_FIELD),
            ({"type": None}, p.INVALID_FIELD),
            ({"agent_id": b"agent-1"}, p.INVALID_FIELD),
            ({"task_id": None}, p.INVALID_FIELD),
            ({"sequence": True}, p.INVALID_FIELD),
            ({"sequence": 1.0}, p.INVALID_FIELD),
            ({"sent_at": None}, p.INVALID_FIELD),
            ({"payload": ["x"]}, p.INVALID_FIELD),
            ({"payload": "x"}, p.INVALID_FIELD),
        ]
        for change, code in cases:
            envelope = dataclasses.replace(base, **change)
            error = self.assertRaises(ProtocolError, envelope.validate, AGENT)
            self.assertEqual(error.code, code, (change, str(error)))

    def test_validate_authenticated_id(self) -> None:
        """The same envelope is valid for its own agent and refused for another."""
        envelope = Envelope.from_json(dumps(valid_doc()))
        envelope.validate(AGENT)
        error = self.assertRaises(ProtocolError, envelope.validate, "agent-2")
        self.assertEqual(error.code, p.AGENT_ID_MISMATCH)

    def test_task_fields_optional_outside_task_types(self) -> None:
        """task_id, execution_attempt_id and sequence may accompany non-task types."""
        doc = valid_doc(ACK)
        doc.update(task_id="t", execution_attempt_id="a", sequence=4)
        self.assertEqual(parse_envelope(dumps(doc), AGENT).sequence, 4)

    def test_other_payloads_unchecked(self) -> None:
        """Types without a payload schema in phase 1 accept any object."""
        for type_ in (AGENT_HELLO, TASK_DELIVER, TASK_RECEIVED, TASK_STARTED,
                      TASK_LEASE_HEARTBEAT):
            doc = valid_doc(type_)
            doc["payload"] = {"anything": [1, {"nested": None}], "x": 1.5}
            parse_envelope(dumps(doc), AGENT)

    def test_payload_unknown_keys_ignored(self) -> None:
        """Typed payloads ignore keys they do not know."""
        doc = valid_doc(ERROR)
        doc["payload"]["details"] = {"x": 1}
        parse_envelope(dumps(doc), AGENT)

    def test_immutable(self) -> None:
        """Fields cannot be reassigned and the payload cannot be changed, even nested."""
        source: dict[str, Any] = {"a": {"b": [1]}}
        envelope = Envelope(TASK_DELIVER, "m", AGENT, SENT_AT, source)
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, envelope, "type", ACK)
        self.assertRaises(TypeError, operator.setitem, envelope.payload, "a", 1)
        self.assertRaises(TypeError, operator.setitem, envelope.payload["a"], "b", 1)
        source["a"]["b"].append(2)
        source["c"] = 3
        self.assertEqual(json.loads(envelope.to_json())["payload"], {"a": {"b": [1]}})

    def test_equality(self) -> None:
        """Envelopes compare by value, payload included."""
        one = Envelope(ACK, "m", AGENT, SENT_AT, {"a": 1})
        self.assertEqual(one, Envelope(ACK, "m", AGENT, SENT_AT, {"a": 1}))
        self.assertNotEqual(one, Envelope(ACK, "m", AGENT, SENT_AT, {"a": 2}))

    def test_parse_envelope_returns_envelope(self) -> None:
        """parse_envelope returns the parsed envelope."""
        envelope = parse_envelope(dumps(valid_doc(TASK_FINAL)).encode(), AGENT)
        self.assertEqual(envelope.task_id, "task_1")
        self.assertEqual(envelope.payload["status"], "completed")

    def test_recursion_error_is_caught(self) -> None:
        """With the depth pre-check disabled, json's RecursionError still does not escape."""
        self.patch(jsontext, "MAX_NESTING_DEPTH", 10**9)
        error = self.assertRaises(ProtocolError, Envelope.from_json,
                                  "[" * 100_000 + "]" * 100_000)
        self.assertEqual(error.code, p.NESTING_TOO_DEEP)

    def test_nesting_limit_boundary(self) -> None:
        """Exactly MAX_NESTING_DEPTH levels are accepted; one more is refused."""
        arrays = p.MAX_NESTING_DEPTH - 2  # the envelope and the payload are two levels
        inner = "[" * arrays + "]" * arrays
        doc = dumps(valid_doc(AGENT_HELLO)).replace('"payload":{}', f'"payload":{{"a":{inner}}}')
        parse_envelope(doc, AGENT)
        deeper = doc.replace('"a":[', '"a":[[').replace("]}}", "]]}}")
        error = self.assertRaises(ProtocolError, parse_envelope, deeper, AGENT)
        self.assertEqual(error.code, p.NESTING_TOO_DEEP)

    def test_brackets_in_strings_do_not_count(self) -> None:
        """Brackets inside strings (escaped quotes too) are not nesting."""
        doc = valid_doc(TASK_OUTPUT)
        doc["payload"]["data"] = '\\"[{' * 1000
        parse_envelope(dumps(doc), AGENT)

    def test_unterminated_string_scanned_once(self) -> None:
        """The depth scanner consumes an unterminated string to the end in one token.

        Were it to fail instead, the scan would restart at every escaped quote
        inside: quadratic time for a frame of many ``\\"``.
        """
        text = '"' + '\\"' * 10 + "[["
        self.assertEqual(jsontext._DEPTH_TOKEN.match(text).group(), text)  # type: ignore[union-attr]
        self.assertEqual(jsontext._DEPTH_TOKEN.match(text + "\\").group(), text + "\\")  # type: ignore[union-attr]
        # Many brackets (so the scan runs) but shallow, then the hostile string.
        frame = "[" + "[]," * 70 + '"' + '\\"' * 200_000
        started = time.perf_counter()
        error = self.assertRaises(ProtocolError, Envelope.from_json, frame)
        self.assertEqual(error.code, p.INVALID_JSON)
        self.assertLess(time.perf_counter() - started, 5.0)

    def test_small_integers_in_other_payloads(self) -> None:
        """Numbers within the literal limit in untyped payloads are fine, floats too."""
        doc = valid_doc(TASK_DELIVER)
        doc["payload"] = {"big": 10**39, "f": 1.5e300, "neg": -3}
        self.assertEqual(parse_envelope(dumps(doc), AGENT).payload["big"], 10**39)


class ProtocolErrorTests(SynchronousTestCase):
    """The module's one exception."""

    def test_attributes_and_str(self) -> None:
        """code, message and field are kept; str() reads well and names the code."""
        error = ProtocolError(p.MISSING_FIELD, "message_id is required", "message_id")
        self.assertEqual((error.code, error.message, error.field),
                         (p.MISSING_FIELD, "message_id is required", "message_id"))
        self.assertEqual(str(error), "message_id is required [missing_field]")
        self.assertIn("missing_field", repr(error))

    def test_codes_distinct(self) -> None:
        """Every code constant is a distinct snake_case string."""
        codes = [p.INVALID_UTF8, p.INVALID_JSON, p.NESTING_TOO_DEEP, p.NUMBER_OUT_OF_RANGE,
                 p.DUPLICATE_KEY, p.NOT_OBJECT, p.UNSUPPORTED_PROTOCOL_VERSION,
                 p.MISSING_FIELD, p.INVALID_FIELD, p.UNKNOWN_TYPE, p.AGENT_ID_MISMATCH,
                 p.INVALID_PAYLOAD, p.INVALID_ARGUMENT]
        self.assertEqual(len(set(codes)), len(codes))
        for code in codes:
            self.assertTrue(re.fullmatch(r"[a-z0-9_]+", code), code)

    def test_messages_truncate_peer_data(self) -> None:
        """A huge hostile value is not copied whole into the message."""
        doc = valid_doc()
        doc["agent_id"] = "x" * 100_000
        error = self.assertRaises(ProtocolError, parse_envelope, dumps(doc), AGENT)
        self.assertLess(len(str(error)), 400)

    def test_constants(self) -> None:
        """The ten message types of §5, six of them task types."""
        self.assertEqual(PROTOCOL_VERSION, 1)
        self.assertEqual(MESSAGE_TYPES, {
            "agent.hello", "agent.hello_ack", "task.deliver", "task.received", "task.started",
            "task.lease_heartbeat", "task.output", "task.final", "ack", "error"})
        self.assertEqual(TASK_TYPES, {
            "task.deliver", "task.received", "task.started", "task.lease_heartbeat",
            "task.output", "task.final"})
        self.assertIsInstance(MESSAGE_TYPES, frozenset)
        self.assertIsInstance(TASK_TYPES, frozenset)


# --- time, ids, building -------------------------------------------------------------


class TimeTests(SynchronousTestCase):
    """format_sent_at and parse_sent_at."""

    def test_format(self) -> None:
        """RFC 3339 UTC, whole seconds, fractions floored, years zero-padded."""
        self.assertEqual(format_sent_at(SENT_AT_UNIX), SENT_AT)
        self.assertEqual(format_sent_at(SENT_AT_UNIX + 0.999), SENT_AT)
        self.assertEqual(format_sent_at(0), "1970-01-01T00:00:00Z")
        self.assertEqual(format_sent_at(-0.5), "1969-12-31T23:59:59Z")
        self.assertEqual(format_sent_at(-62135596800), "0001-01-01T00:00:00Z")
        self.assertEqual(format_sent_at(-50000000000), "0385-07-25T07:06:40Z")

    def test_format_refuses_nonsense(self) -> None:
        """NaN, infinities and out-of-range times raise ProtocolError."""
        for value in (float("nan"), float("inf"), -float("inf"), 1e20, -1e20):
            error = self.assertRaises(ProtocolError, format_sent_at, value)
            self.assertEqual(error.code, p.INVALID_ARGUMENT)

    def test_parse(self) -> None:
        """parse_sent_at returns the aware UTC time; bad forms raise INVALID_FIELD."""
        self.assertEqual(parse_sent_at(SENT_AT).timestamp(), SENT_AT_UNIX)
        for bad in BAD_SENT_AT:
            error = self.assertRaises(ProtocolError, parse_sent_at, bad)
            self.assertEqual((error.code, error.field), (p.INVALID_FIELD, "sent_at"))

    @FUZZ
    @given(st.integers(min_value=-62135596800, max_value=253402300799),
           st.floats(min_value=0, max_value=0.999))
    def test_format_parse_round_trip(self, seconds: int, fraction: float) -> None:
        """Every formatted time parses back to its whole second."""
        text = format_sent_at(seconds + fraction)
        self.assertEqual(int(parse_sent_at(text).timestamp()), seconds)


class MessageIdTests(SynchronousTestCase):
    """MessageIdGenerator."""

    def test_format_and_clock(self) -> None:
        """Ids are msg_<unix nanoseconds> from the injected clock."""
        generator = MessageIdGenerator(clock=lambda: 1777287780123456789)
        self.assertEqual(generator(), "msg_1777287780123456789")

    def test_clock_standing_still(self) -> None:
        """A clock that does not move still yields strictly increasing ids."""
        generator = MessageIdGenerator(clock=lambda: 1000)
        self.assertEqual([generator() for _ in range(3)], ["msg_1000", "msg_1001", "msg_1002"])

    def test_clock_going_back(self) -> None:
        """A clock stepping back does not repeat or decrease ids."""
        times = iter([5000, 4000, 4500, 6000])
        generator = MessageIdGenerator(clock=lambda: next(times))
        self.assertEqual([generator() for _ in range(4)],
                         ["msg_5000", "msg_5001", "msg_5002", "msg_6000"])

    def test_default_generator(self) -> None:
        """The module-level generator uses the wall clock and never repeats."""
        before = time.time_ns()
        ids = [new_message_id() for _ in range(1000)]
        numbers = [int(i.removeprefix("msg_")) for i in ids]
        self.assertEqual(numbers, sorted(set(numbers)))
        self.assertGreaterEqual(numbers[0], before)
        self.assertTrue(all(re.fullmatch(r"msg_[0-9]+", i) for i in ids))


class MakeEnvelopeTests(SynchronousTestCase):
    """make_envelope."""

    def test_defaults(self) -> None:
        """A hello built with defaults is valid, with a fresh id and the current time."""
        before = time.time()
        envelope = make_envelope(AGENT_HELLO, AGENT)
        envelope.validate(AGENT)
        self.assertEqual(envelope.payload, {})
        self.assertEqual(envelope.protocol_version, 1)
        self.assertTrue(envelope.message_id.startswith("msg_"))
        self.assertLessEqual(abs(parse_sent_at(envelope.sent_at).timestamp() - before), 2)
        self.assertNotEqual(make_envelope(AGENT_HELLO, AGENT).message_id, envelope.message_id)

    def test_explicit(self) -> None:
        """Every keyword lands in its field."""
        envelope = make_envelope(
            TASK_OUTPUT, AGENT, {"stream": "stderr", "data": "", "byte_count": 0},
            message_id="msg_9", now=SENT_AT_UNIX + 0.5, task_id="t", execution_attempt_id="a",
            sequence=7)
        envelope.validate(AGENT)
        self.assertEqual(
            (envelope.message_id, envelope.sent_at, envelope.task_id,
             envelope.execution_attempt_id, envelope.sequence),
            ("msg_9", SENT_AT, "t", "a", 7))

    def test_hello_ack_flow(self) -> None:
        """The control plane's hello_ack built from the agent's hello validates."""
        hello = make_envelope(AGENT_HELLO, AGENT)
        ack = make_envelope(AGENT_HELLO_ACK, AGENT,
                            ack_payload(hello.message_id, hello.type))
        received = parse_envelope(ack.to_json(), AGENT)
        payload = typed_payload(received)
        assert isinstance(payload, AckPayload)
        self.assertEqual(payload.acked_message_id, hello.message_id)


# --- payloads ---------------------------------------------------------------------------


class PayloadTests(SynchronousTestCase):
    """Typed payloads and builders."""

    def test_ack(self) -> None:
        """Optional ack fields are omitted when absent and kept when set."""
        self.assertEqual(ack_payload("m", ACK), {"acked_message_id": "m", "acked_type": "ack"})
        full = ack_payload("m", TASK_OUTPUT, "t", "a", 0)
        self.assertEqual(full, {"acked_message_id": "m", "acked_type": TASK_OUTPUT,
                                "task_id": "t", "execution_attempt_id": "a",
                                "highest_output_sequence": 0})
        self.assertEqual(AckPayload.from_dict(full),
                         AckPayload("m", TASK_OUTPUT, "t", "a", 0))
        self.assertEqual(AckPayload.from_dict(full).to_dict(), full)

    def test_error(self) -> None:
        """error_payload writes related_message_id only when set."""
        self.assertEqual(error_payload("c", "m", True),
                         {"code": "c", "message": "m", "retryable": True})
        self.assertEqual(error_payload("c", "m", False, "msg_1")["related_message_id"], "msg_1")
        self.assertEqual(ErrorPayload.from_dict(error_payload("c", "m", False, "r")),
                         ErrorPayload("c", "m", False, "r"))

    def test_builders_refuse_wrong_types(self) -> None:
        """Builders refuse what a receiver would refuse."""
        self.assertRaises(ProtocolError, error_payload, "c", "m", 1)
        self.assertRaises(ProtocolError, ack_payload, "m", None)
        self.assertRaises(ProtocolError, ack_payload, "m", ACK, highest_output_sequence=True)

    def test_output_and_final(self) -> None:
        """Output and final payloads round-trip, with defaults for absent optionals."""
        output = {"stream": "stderr", "data": "x", "byte_count": 1, "truncated_locally": True}
        self.assertEqual(TaskOutputPayload.from_dict(output).to_dict(), output)
        self.assertFalse(TaskOutputPayload.from_dict(
            {"stream": "stdout", "data": "", "byte_count": 0}).truncated_locally)
        final = {"status": "interrupted", "exit_code": -9, "output": "o", "error": "e",
                 "output_truncated": True, "error_truncated": True}
        self.assertEqual(TaskFinalPayload.from_dict(final).to_dict(), final)
        self.assertEqual(TaskFinalPayload.from_dict({"status": "failed", "exit_code": 2}),
                         TaskFinalPayload("failed", 2))

    def test_not_a_mapping(self) -> None:
        """from_dict of a non-object raises INVALID_PAYLOAD."""
        for cls in (AckPayload, ErrorPayload, TaskOutputPayload, TaskFinalPayload):
            error = self.assertRaises(ProtocolError, cls.from_dict, ["x"])
            self.assertEqual(error.code, p.INVALID_PAYLOAD)

    def test_typed_payload(self) -> None:
        """typed_payload picks the class by type; types without a schema give None."""
        expected = {ACK: AckPayload, AGENT_HELLO_ACK: AckPayload, ERROR: ErrorPayload,
                    TASK_OUTPUT: TaskOutputPayload, TASK_FINAL: TaskFinalPayload}
        for type_ in MESSAGE_TYPES:
            payload = typed_payload(Envelope.from_json(dumps(valid_doc(type_))))
            if type_ in expected:
                self.assertIsInstance(payload, expected[type_])
            else:
                self.assertIsNone(payload)


# --- trackers ---------------------------------------------------------------------------


class DuplicateTrackerTests(SynchronousTestCase):
    """DuplicateTracker."""

    def test_repeat(self) -> None:
        """The first sighting is new, every later one a repeat."""
        tracker = DuplicateTracker()
        self.assertFalse(tracker.seen("a"))
        self.assertTrue(tracker.seen("a"))
        self.assertTrue(tracker.seen("a"))
        self.assertFalse(tracker.seen("b"))
        self.assertIn("a", tracker)

    def test_bounded(self) -> None:
        """Past max_entries the oldest id is forgotten; size never exceeds the bound."""
        tracker = DuplicateTracker(max_entries=3)
        for message_id in "abcd":
            self.assertFalse(tracker.seen(message_id))
        self.assertEqual(len(tracker), 3)
        self.assertNotIn("a", tracker)
        self.assertTrue(tracker.seen("d"))
        self.assertFalse(tracker.seen("a"))  # forgotten, so new again

    def test_repeat_refreshes(self) -> None:
        """A repeated id counts as recent and outlives older ones."""
        tracker = DuplicateTracker(max_entries=2)
        tracker.seen("a")
        tracker.seen("b")
        tracker.seen("a")
        tracker.seen("c")
        self.assertEqual(("a" in tracker, "b" in tracker), (True, False))

    def test_default_bound(self) -> None:
        """A long session stays at 10000 remembered ids."""
        tracker = DuplicateTracker()
        for number in range(25_000):
            tracker.seen(f"msg_{number}")
        self.assertEqual(len(tracker), 10_000)
        self.assertTrue(tracker.seen("msg_24999"))
        tracker.clear()
        self.assertEqual(len(tracker), 0)

    def test_bad_bound(self) -> None:
        """A bound below 1 is refused."""
        for bad in (0, -1, True, 1.5):
            self.assertRaises(ProtocolError, DuplicateTracker, bad)


class OutputSequenceTrackerTests(SynchronousTestCase):
    """OutputSequenceTracker."""

    def test_in_order(self) -> None:
        """Sequences start at 1; each accepted one moves the expectation on."""
        tracker = OutputSequenceTracker()
        self.assertEqual(tracker.check("a", "stdout", 1), SequenceVerdict("accepted", 2))
        self.assertEqual(tracker.check("a", "stdout", 2), SequenceVerdict("accepted", 3))
        self.assertEqual(tracker.highest("a", "stdout"), 2)

    def test_duplicate(self) -> None:
        """Lower or equal to the highest is a duplicate; the expectation stays."""
        tracker = OutputSequenceTracker()
        tracker.check("a", "stdout", 1)
        tracker.check("a", "stdout", 2)
        for sequence in (2, 1, 0, -5):
            verdict = tracker.check("a", "stdout", sequence)
            self.assertEqual(verdict, SequenceVerdict("duplicate", 3))
            self.assertFalse(verdict.retryable)

    def test_gap(self) -> None:
        """Higher than highest + 1 is a retryable gap naming the missing sequence."""
        tracker = OutputSequenceTracker()
        verdict = tracker.check("a", "stdout", 2)
        self.assertEqual(verdict, SequenceVerdict("gap", 1))
        self.assertTrue(verdict.retryable)
        self.assertEqual(tracker.highest("a", "stdout"), 0)  # a gap is not accepted
        self.assertEqual(tracker.check("a", "stdout", 1).status, "accepted")
        self.assertEqual(tracker.check("a", "stdout", 2).status, "accepted")

    def test_per_attempt_and_stream(self) -> None:
        """Attempts and streams count independently."""
        tracker = OutputSequenceTracker()
        tracker.check("a", "stdout", 1)
        self.assertEqual(tracker.check("a", "stderr", 1).status, "accepted")
        self.assertEqual(tracker.check("b", "stdout", 1).status, "accepted")
        self.assertEqual(tracker.check("a", "stdout", 1).status, "duplicate")

    def test_bounded(self) -> None:
        """Past max_attempts the least recently used attempt is forgotten."""
        tracker = OutputSequenceTracker(max_attempts=2)
        tracker.check("a", "stdout", 1)
        tracker.check("b", "stdout", 1)
        tracker.check("a", "stdout", 2)  # "a" is now the most recent
        tracker.check("c", "stdout", 1)
        self.assertEqual(len(tracker), 2)
        self.assertEqual(tracker.highest("b", "stdout"), 0)
        self.assertEqual(tracker.highest("a", "stdout"), 2)
        for number in range(5000):
            tracker.check(f"x{number}", "stdout", 1)
        self.assertEqual(len(tracker), 2)

    def test_forget(self) -> None:
        """A forgotten attempt starts again at 1."""
        tracker = OutputSequenceTracker()
        tracker.check("a", "stdout", 1)
        tracker.forget("a")
        tracker.forget("never-seen")
        self.assertEqual(len(tracker), 0)
        self.assertEqual(tracker.check("a", "stdout", 1).status, "accepted")

    def test_bad_arguments(self) -> None:
        """Unknown streams, non-integer sequences and bad bounds raise ProtocolError."""
        tracker = OutputSequenceTracker()
        self.assertRaises(ProtocolError, tracker.check, "a", "stdin", 1)
        self.assertRaises(ProtocolError, tracker.check, "a", "stdout", True)
        self.assertRaises(ProtocolError, tracker.check, "a", "stdout", 1.0)
        self.assertRaises(ProtocolError, OutputSequenceTracker, 0)
        self.assertEqual(len(tracker), 0)

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["stdout", "stderr"]),
                              st.integers(min_value=-2, max_value=8)), max_size=60))
    def test_model(self, checks: list[tuple[str, str, int]]) -> None:
        """Against a plain model: verdicts follow highest + 1 for any order of arrivals."""
        tracker = OutputSequenceTracker()
        highest: dict[tuple[str, str], int] = {}
        for attempt, stream, sequence in checks:
            expected = highest.get((attempt, stream), 0) + 1
            verdict = tracker.check(attempt, stream, sequence)
            if sequence == expected:
                highest[(attempt, stream)] = sequence
                self.assertEqual(verdict, SequenceVerdict("accepted", sequence + 1))
            elif sequence < expected:
                self.assertEqual(verdict, SequenceVerdict("duplicate", expected))
            else:
                self.assertEqual(verdict, SequenceVerdict("gap", expected))


# --- hypothesis: hostile input ------------------------------------------------------------

# Integers stay within 64 bits: longer literals are refused by design (tested above).
json_scalars = (st.none() | st.booleans()
                | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.text(max_size=20)
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
ENVELOPE_FIELDS = ["protocol_version", "message_id", "type", "agent_id", "task_id",
                   "execution_attempt_id", "sequence", "sent_at", "payload"]
INT_FIELDS = [(None, "protocol_version"), (None, "sequence"),
              (TASK_OUTPUT, "payload.byte_count"), (TASK_FINAL, "payload.exit_code"),
              (ACK, "payload.highest_output_sequence")]


def _parse_only_protocol_errors(frame: str | bytes) -> Envelope | None:
    """Parse *frame*; return the envelope or None if refused; any other exception fails."""
    try:
        return parse_envelope(frame, AGENT)
    except ProtocolError as error:
        assert isinstance(error.code, str) and error.code
        str(error)
        return None


class FuzzTests(SynchronousTestCase):
    """Hypothesis: whatever arrives, only ProtocolError comes out."""

    @FUZZ
    @given(st.text())
    def test_any_text(self, text: str) -> None:
        """Any text."""
        _parse_only_protocol_errors(text)

    @FUZZ
    @given(st.binary())
    def test_any_binary(self, data: bytes) -> None:
        """Any bytes."""
        _parse_only_protocol_errors(data)

    @FUZZ
    @given(st.sampled_from(sorted(MESSAGE_TYPES)), st.data())
    def test_non_utf8(self, type_: str, data: st.DataObject) -> None:
        """A valid frame with a byte that can never occur in UTF-8 is refused as invalid_utf8."""
        frame = dumps(valid_doc(type_)).encode()
        where = data.draw(st.integers(0, len(frame)))
        bad = data.draw(st.sampled_from([b"\xff", b"\xfe", b"\xc0", b"\xc1", b"\xf8"]))
        error = self.assertRaises(ProtocolError, parse_envelope,
                                  frame[:where] + bad + frame[where:], AGENT)
        self.assertEqual(error.code, p.INVALID_UTF8)

    @FUZZ
    @given(st.integers(min_value=p.MAX_NESTING_DEPTH + 1, max_value=20_000),
           st.lists(st.sampled_from(["[", '{"k":']), min_size=1), st.booleans())
    def test_deep_nesting(self, depth: int, openers: list[str], close: bool) -> None:
        """Nesting beyond the limit in the payload is refused, closed or not."""
        chain = [openers[i % len(openers)] for i in range(depth)]
        prefix = "".join(chain)
        suffix = "".join("]" if part == "[" else "}" for part in reversed(chain)) if close else ""
        frame = dumps(valid_doc(AGENT_HELLO)).replace('"payload":{}',
                                                       f'"payload":{{"x":{prefix}1{suffix}}}')
        error = self.assertRaises(ProtocolError, parse_envelope, frame, AGENT)
        self.assertEqual(error.code, p.NESTING_TOO_DEEP)

    @FUZZ
    @given(st.sampled_from(ENVELOPE_FIELDS + ["payload.x"]),
           st.integers(min_value=p.MAX_INT_LITERAL_LENGTH + 1, max_value=10_000),
           st.booleans())
    def test_huge_numbers(self, field: str, digits: int, negative: bool) -> None:
        """Integer literals of thousands of digits anywhere are refused, fast."""
        doc = valid_doc(TASK_OUTPUT)
        put(field, 0)(doc)
        literal = ("-" if negative else "") + "7" * digits
        frame = re.sub(r'(?<=[{,]"' + field.split(".")[-1] + r'":)0(?=[,}])', literal,
                       dumps(doc), count=1)
        self.assertIn(literal, frame)
        error = self.assertRaises(ProtocolError, parse_envelope, frame, AGENT)
        self.assertEqual(error.code, p.NUMBER_OUT_OF_RANGE)

    @FUZZ
    @given(st.sampled_from(ENVELOPE_FIELDS + ["payload.x", "payload.data"]),
           st.sampled_from(["NaN", "Infinity", "-Infinity"]))
    def test_nan_infinity(self, field: str, literal: str) -> None:
        """NaN and Infinity literals anywhere are refused as invalid JSON."""
        doc = valid_doc(TASK_OUTPUT)
        put(field, float(literal.replace("Infinity", "inf")))(doc)
        frame = dumps(doc)
        self.assertIn(literal, frame)
        error = self.assertRaises(ProtocolError, parse_envelope, frame, AGENT)
        self.assertEqual(error.code, p.INVALID_JSON)

    @FUZZ
    @given(st.sampled_from(sorted(MESSAGE_TYPES)), st.data())
    def test_duplicate_keys(self, type_: str, data: st.DataObject) -> None:
        """Any repeated key, top level or in the payload, is refused."""
        doc = valid_doc(type_)
        payload_keys = list(doc["payload"])
        in_payload = bool(payload_keys) and data.draw(st.booleans())
        target = doc["payload"] if in_payload else doc
        key = data.draw(st.sampled_from(sorted(target)))
        value = data.draw(json_values)
        text = dumps(target)
        extra = f"{dumps(key)}:{dumps(value)}"
        duplicated = text[:-1] + "," + extra + "}"
        frame = dumps(doc).replace(text, duplicated, 1) if in_payload else duplicated
        error = self.assertRaises(ProtocolError, parse_envelope, frame, AGENT)
        self.assertEqual(error.code, p.DUPLICATE_KEY)

    @FUZZ
    @given(st.sampled_from(INT_FIELDS),
           st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
           | st.integers(min_value=-3, max_value=3).map(float),
           st.booleans())
    def test_floats_where_ints_belong(self, where: tuple[str | None, str], value: float,
                                      exponent: bool) -> None:
        """1.0 (or 1e0) is not an integer, whether in the envelope or a payload."""
        type_, field = where
        doc = valid_doc(type_ or TASK_OUTPUT)
        put(field, value)(doc)
        frame = dumps(doc)
        if exponent and value == int(value):
            literal = f":{json.dumps(value)}"
            self.assertIn(literal, frame)
            frame = frame.replace(literal, f":{int(value)}e0", 1)
        expected = p.INVALID_PAYLOAD if field.startswith("payload.") else p.INVALID_FIELD
        error = self.assertRaises(ProtocolError, parse_envelope, frame, AGENT)
        self.assertEqual(error.code, expected, str(error))

    @FUZZ
    @given(st.sampled_from(INT_FIELDS), st.booleans())
    def test_booleans_where_ints_belong(self, where: tuple[str | None, str],
                                        value: bool) -> None:
        """true is not 1 and false is not 0."""
        type_, field = where
        doc = valid_doc(type_ or TASK_OUTPUT)
        put(field, value)(doc)
        expected = p.INVALID_PAYLOAD if field.startswith("payload.") else p.INVALID_FIELD
        error = self.assertRaises(ProtocolError, parse_envelope, dumps(doc), AGENT)
        self.assertEqual(error.code, expected, str(error))

    @FUZZ
    @given(st.sampled_from(sorted(MESSAGE_TYPES)),
           st.dictionaries(st.sampled_from(ENVELOPE_FIELDS + ["payload.x"]), json_values,
                           min_size=1, max_size=4))
    def test_arbitrary_field_values(self, type_: str, changes: dict[str, Any]) -> None:
        """Any JSON value in any field: accepted or refused with ProtocolError."""
        doc = valid_doc(type_)
        for field, value in changes.items():
            if field.startswith("payload.") and not isinstance(doc.get("payload"), dict):
                continue
            put(field, value)(doc)
        _parse_only_protocol_errors(dumps(doc))
        _parse_only_protocol_errors(dumps(doc).encode())

    @FUZZ
    @given(st.sampled_from(sorted(MESSAGE_TYPES)), st.data())
    def test_mutated_bytes(self, type_: str, data: st.DataObject) -> None:
        """A valid frame with random bytes overwritten, inserted or cut."""
        frame = bytearray(dumps(valid_doc(type_)).encode())
        for _ in range(data.draw(st.integers(1, 4))):
            where = data.draw(st.integers(0, len(frame)))
            action = data.draw(st.sampled_from(["set", "insert", "cut"]))
            byte = data.draw(st.integers(0, 255))
            if action == "set" and where < len(frame):
                frame[where] = byte
            elif action == "insert":
                frame.insert(where, byte)
            else:
                del frame[where:where + data.draw(st.integers(1, 8))]
        _parse_only_protocol_errors(bytes(frame))


# --- hypothesis: valid envelopes round-trip ---------------------------------------------------

ids = st.text(min_size=1, max_size=30)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
untyped_payloads = st.dictionaries(st.text(max_size=10), json_values, max_size=5)
# Keys no typed payload defines, so extras never clash with an optional field.
extra_keys = st.dictionaries(st.text(max_size=10).map(lambda key: "x_" + key), json_values,
                             max_size=3)
sent_ats = st.integers(min_value=-62135596800, max_value=253402300799).map(format_sent_at)

typed_payloads: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    ACK: st.builds(ack_payload, st.text(), st.text(), st.text(), st.text(), st.none() | int64),
    AGENT_HELLO_ACK: st.builds(ack_payload, st.text(), st.text(), st.text(), st.text(),
                               st.none() | int64),
    ERROR: st.builds(error_payload, st.text(), st.text(), st.booleans(), st.text()),
    TASK_OUTPUT: st.builds(
        lambda *args: TaskOutputPayload(*args).to_dict(),
        st.sampled_from(["stdout", "stderr"]), st.text(),
        st.integers(min_value=0, max_value=2**63 - 1), st.booleans()),
    TASK_FINAL: st.builds(
        lambda *args: TaskFinalPayload(*args).to_dict(),
        st.sampled_from(["completed", "failed", "interrupted"]), int64, st.text(), st.text(),
        st.booleans(), st.booleans()),
}


@st.composite
def valid_envelopes(draw: st.DrawFn) -> Envelope:
    """Draw an envelope that satisfies every rule of §5 for AGENT."""
    type_ = draw(st.sampled_from(sorted(MESSAGE_TYPES)))
    task = type_ in TASK_TYPES
    payload = draw(typed_payloads.get(type_, untyped_payloads))
    if type_ in typed_payloads:
        extra = draw(extra_keys)  # unknown payload keys ride along
        payload = {**extra, **payload}
    return Envelope(
        type=type_,
        message_id=draw(ids),
        agent_id=AGENT,
        sent_at=draw(sent_ats),
        payload=payload,
        task_id=draw(ids if task else st.just("") | ids),
        execution_attempt_id=draw(ids if task else st.just("") | ids),
        sequence=draw(int64 if type_ == TASK_OUTPUT else st.none() | int64),
    )


class RoundTripTests(SynchronousTestCase):
    """Hypothesis: valid envelopes survive to_json / from_json / validate unchanged."""

    @FUZZ
    @given(valid_envelopes())
    def test_round_trip(self, envelope: Envelope) -> None:
        """Serialise, parse (text and bytes), validate: the same envelope comes back."""
        envelope.validate(AGENT)
        text = envelope.to_json()
        self.assertEqual(parse_envelope(text, AGENT), envelope)
        self.assertEqual(parse_envelope(text.encode("utf-8"), AGENT), envelope)
        document = json.loads(text)
        self.assertEqual("task_id" in document, bool(envelope.task_id))
        self.assertEqual("execution_attempt_id" in document,
                         bool(envelope.execution_attempt_id))
        self.assertEqual("sequence" in document, envelope.sequence is not None)
        self.assertIsInstance(document["payload"], dict)

    @FUZZ
    @given(st.sampled_from(sorted(typed_payloads)), st.data())
    def test_typed_payload_round_trip(self, type_: str, data: st.DataObject) -> None:
        """from_dict(to_dict(x)) == x for every typed payload."""
        payload = data.draw(typed_payloads[type_])
        envelope = Envelope(type_, "m", AGENT, SENT_AT, payload, task_id="t",
                            execution_attempt_id="a", sequence=1)
        parsed = typed_payload(envelope)
        assert parsed is not None
        self.assertEqual(parsed.to_dict(), payload)
        self.assertEqual(type(parsed).from_dict(parsed.to_dict()), parsed)
