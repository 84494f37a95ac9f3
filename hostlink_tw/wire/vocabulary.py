"""
The wire vocabulary both sides share: every name and number of the protocol
defined once (docs/protocol.rst).

Message types, the protocol version, the gateway path, the signed header
names, the WebSocket close codes either side sends, and the agent-id rule.
The agent (:mod:`hostlink_tw.agent`), the envelope code
(:mod:`hostlink_tw.wire.envelope`), signing and the reference control plane all
import them from here.
"""

from __future__ import annotations

import re

from hostlink_tw._json import json_kind

__all__ = [
    "ACK",
    "AGENT_HELLO",
    "AGENT_HELLO_ACK",
    "AGENT_ID_MAX_LENGTH",
    "AGENT_ID_PATTERN",
    "AGENT_ID_RULE",
    "CLOSE_ABNORMAL",
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID_PAYLOAD",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_REPLACED",
    "CLOSE_TOO_BIG",
    "CLOSE_UNSUPPORTED_DATA",
    "ERROR",
    "ERROR_DELIVERY_DISABLED",
    "ERROR_OUTPUT_SEQUENCE_GAP",
    "ERROR_QUEUE_FULL",
    "ERROR_STORE_UNAVAILABLE",
    "GATEWAY_PATH",
    "HEADER_AGENT_ID",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "MAX_FRAMES_PER_MESSAGE",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "SIGNED_HEADERS",
    "TASK_DELIVER",
    "TASK_FINAL",
    "TASK_LEASE_HEARTBEAT",
    "TASK_OUTPUT",
    "TASK_RECEIVED",
    "TASK_STARTED",
    "TASK_TYPES",
    "agent_id_problem",
    "check_agent_id",
]

#: Where agents open their WebSocket, joined onto the control plane URL (§3).
GATEWAY_PATH = "/api/v1/agents/ws"

# --- the signed headers (§2) -----------------------------------------------------

HEADER_AGENT_ID = "X-Agent-ID"
HEADER_TIMESTAMP = "X-Timestamp"
HEADER_NONCE = "X-Nonce"
HEADER_SIGNATURE = "X-Signature"

#: The four headers every authenticated request carries, in order.
SIGNED_HEADERS = (HEADER_AGENT_ID, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)

# --- phase-2 ``error`` codes (PROTOCOL §7.5, §8.1, §8.2, §8.7) -------------------

#: Control plane → agent, retryable: re-send a stream above ``highest_accepted_sequence``.
ERROR_OUTPUT_SEQUENCE_GAP = "output_sequence_gap"
#: Agent → control plane: a ``task.deliver`` while delivery is off (not retryable).
ERROR_DELIVERY_DISABLED = "delivery_disabled"
#: Agent → control plane: the queue of received attempts is full (retryable).
ERROR_QUEUE_FULL = "queue_full"
#: Agent → control plane: the local store cannot be used (retryable).
ERROR_STORE_UNAVAILABLE = "store_unavailable"

# --- WebSocket close codes (RFC 6455 §7.4.1, and ours) ---------------------------

CLOSE_NORMAL = 1000
#: The control plane is stopping.
CLOSE_GOING_AWAY = 1001
#: A binary frame (the protocol uses text frames only).
CLOSE_UNSUPPORTED_DATA = 1003
#: No close frame: the TCP connection just ended (never sent, only reported).
CLOSE_ABNORMAL = 1006
#: A frame that is not UTF-8 or not JSON.
CLOSE_INVALID_PAYLOAD = 1007
#: An envelope that breaks the protocol's rules.
CLOSE_POLICY = 1008
#: A message larger than the configured maximum (or in too many fragments).
CLOSE_TOO_BIG = 1009
#: The agent opened a newer session; this one is closed (private-use range).
CLOSE_REPLACED = 4001

#: Most frames one message may arrive in, on either side.  Autobahn keeps a
#: list entry per frame, and empty continuation frames never approach the
#: size limit; beyond it the receiver closes with :data:`CLOSE_TOO_BIG`.
MAX_FRAMES_PER_MESSAGE = 1024

#: The only protocol version phase 1 speaks.
PROTOCOL_VERSION = 1

# --- agent ids (PROTOCOL §1, §2) ---------------------------------------------

#: The longest agent id: the reference control plane has always refused
#: longer ``X-Agent-ID`` headers.
AGENT_ID_MAX_LENGTH = 256

#: What an agent id may be.  It travels as the ``X-Agent-ID`` header, is
#: signed as UTF-8 by the agent while Autobahn (like many HTTP stacks)
#: decodes request headers as ISO-8859-1, and the Go agent puts it in URL
#: paths (``/api/v1/agents/{agent_id}/heartbeat``): only ASCII letters,
#: digits and ``. _ : @ -`` survive all three unchanged.  Every id the Go
#: agent and the control plane issue (``agt_01HX5Z``, UUIDs, ``agent-<hex>``)
#: fits.
AGENT_ID_PATTERN = re.compile(rf"[A-Za-z0-9._:@-]{{1,{AGENT_ID_MAX_LENGTH}}}", re.ASCII)

#: The rule in words, for error messages.
AGENT_ID_RULE = (
    f"an agent id is 1 to {AGENT_ID_MAX_LENGTH} characters of "
    "A-Z, a-z, 0-9 and . _ : @ -"
)


def agent_id_problem(value: object) -> str | None:
    """What makes *value* not an agent id under :data:`AGENT_ID_RULE`, or ``None``.

    The description names the problem (the type, the length, the code point
    of the first character outside the alphabet) but never repeats the
    value, so it is safe to log or send in an HTTP reason whatever a peer
    sent, and ends with the rule.
    """
    if not isinstance(value, str):
        detail = f"is {json_kind(value)}, not a string"
    elif value == "":
        detail = "is empty"
    elif len(value) > AGENT_ID_MAX_LENGTH:
        detail = f"has {len(value)} characters"
    elif AGENT_ID_PATTERN.fullmatch(value) is None:
        bad = next(ch for ch in value if AGENT_ID_PATTERN.fullmatch(ch) is None)
        kind = "a control character" if ord(bad) < 0x20 or ord(bad) == 0x7F else "a character"
        detail = f"contains {kind} outside the alphabet (U+{ord(bad):04X})"
    else:
        return None
    return f"agent_id {detail}; {AGENT_ID_RULE}"


def check_agent_id(value: object) -> str:
    """
    Check that *value* is an agent id and return it (the raising form of
    :func:`agent_id_problem`).

    The rule is :data:`AGENT_ID_RULE` (1 to 256 characters of
    ``A-Z a-z 0-9 . _ : @ -``), defined once for the agent, ``init`` and
    the control plane: anything else could never authenticate (HTTP header
    decoding, length limits) or would silence logging (lone surrogates).

    :raises ValueError: With a description of the problem that ends with the
        rule.
    """
    problem = agent_id_problem(value)
    if problem is not None:
        raise ValueError(problem)
    assert isinstance(value, str)
    return value




# --- message types (PROTOCOL §5) ---------------------------------------------

AGENT_HELLO = "agent.hello"
AGENT_HELLO_ACK = "agent.hello_ack"
TASK_DELIVER = "task.deliver"
TASK_RECEIVED = "task.received"
TASK_STARTED = "task.started"
TASK_LEASE_HEARTBEAT = "task.lease_heartbeat"
TASK_OUTPUT = "task.output"
TASK_FINAL = "task.final"
ACK = "ack"
ERROR = "error"

#: Every message type of the protocol.
MESSAGE_TYPES: frozenset[str] = frozenset(
    {
        AGENT_HELLO,
        AGENT_HELLO_ACK,
        TASK_DELIVER,
        TASK_RECEIVED,
        TASK_STARTED,
        TASK_LEASE_HEARTBEAT,
        TASK_OUTPUT,
        TASK_FINAL,
        ACK,
        ERROR,
    }
)

#: The ``task.*`` types: each requires ``task_id`` and ``execution_attempt_id``.
TASK_TYPES: frozenset[str] = frozenset(t for t in MESSAGE_TYPES if t.startswith("task."))
