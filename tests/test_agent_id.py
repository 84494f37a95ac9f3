"""
Issues 10.9 and 10.15: one agent-id rule, enforced by the reference control
plane too (the agent side is tested in test_identity, test_signing and
test_cli; the rule itself in test_protocol).

The upgrades here are written by hand over 127.0.0.1, signed with the key
directly (the signer would refuse these ids), with the header bytes a
UTF-8 sender such as the agent used to put on the wire.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Generator
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hostlink_tw.controlplane import (
    GATEWAY_PATH,
    AgentsFileError,
    ControlPlane,
    parse_agents,
    start_control_plane,
)
from hostlink_tw.identity import public_key_base64
from hostlink_tw.protocol import AGENT_ID_RULE
from hostlink_tw.signing import signed_message

from .test_client_support import AGENT, key

TIMEOUT = 5.0


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(None)


def _signed_upgrade(port: int, agent_id: str, now: float) -> bytes:
    timestamp = str(int(now))
    nonce = base64.b64encode(os.urandom(16)).decode("ascii")
    signature = key().sign(
        signed_message(agent_id, timestamp, nonce),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
        hashes.SHA256(),
    )
    lines = [
        f"GET {GATEWAY_PATH} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        f"X-Agent-ID: {agent_id}",
        f"X-Timestamp: {timestamp}",
        f"X-Nonce: {nonce}",
        f"X-Signature: {base64.b64encode(signature).decode('ascii')}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


class UpgradeAgentIdTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def refused(self, agent_id: str) -> Generator[Deferred[Any], Any, tuple[bytes, ControlPlane]]:
        cp: ControlPlane = yield start_control_plane({AGENT: key().public_key()}, ping_interval=0)
        self.addCleanup(cp.stop)
        proto = _Collect()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", cp.port), proto)
        assert proto.transport is not None
        proto.transport.write(_signed_upgrade(cp.port, agent_id, cp.clock()))
        proto.done.addTimeout(TIMEOUT, reactor)
        yield proto.done
        return proto.data, cp

    @inlineCallbacks
    def assert_refused_naming_the_rule(
        self, agent_id: str, needle: str
    ) -> Generator[Deferred[Any], Any, None]:
        data, cp = yield self.refused(agent_id)
        self.assertTrue(data.startswith(b"HTTP/1.1 401"), data[:80])
        reason = cp.attempts[-1].reason
        self.assertIn("malformed X-Agent-ID header", reason)
        self.assertIn(needle, reason)
        self.assertIn(AGENT_ID_RULE, reason)
        self.assertIn(AGENT_ID_RULE.encode(), data)
        self.assertEqual(cp.sessions(), [])

    def test_too_long(self) -> Deferred[None]:
        return self.assert_refused_naming_the_rule("a" * 257, "has 257 characters")

    def test_non_ascii(self) -> Deferred[None]:
        # Sent as UTF-8, read as ISO-8859-1: "ë" arrives as "Ã«".
        return self.assert_refused_naming_the_rule("agënt", "(U+00C3)")

    def test_space(self) -> Deferred[None]:
        return self.assert_refused_naming_the_rule("agent one", "(U+0020)")

    @inlineCallbacks
    def test_within_the_rule_is_checked_as_before(self) -> Generator[Deferred[Any], Any, None]:
        data, cp = yield self.refused("agent-unknown.x:1@y_z")
        self.assertTrue(data.startswith(b"HTTP/1.1 401"))
        self.assertEqual(cp.attempts[-1].reason, "unknown agent")


class AgentsFileAgentIdTests(SynchronousTestCase):
    def test_ids_outside_the_rule_refused(self) -> None:
        public = public_key_base64(key())
        for bad, needle in (
            ("agënt", "(U+00EB)"),
            ("a" * 257, "has 257 characters"),
            ("agt\ud800", "(U+D800)"),
            ("agent one", "(U+0020)"),
            ("", "is empty"),
        ):
            error = self.assertRaises(AgentsFileError, parse_agents, {bad: public})
            self.assertIn(needle, str(error))
            self.assertIn(AGENT_ID_RULE, str(error))

    def test_ids_within_the_rule_accepted(self) -> None:
        public = public_key_base64(key())
        ids = ["a", "x" * 256, "agt_01HX5Z", "550e8400-e29b-41d4-a716-446655440000", "h.x:1@y"]
        self.assertEqual(sorted(parse_agents(dict.fromkeys(ids, public))), sorted(ids))
