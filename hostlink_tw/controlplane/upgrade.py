"""
The signed upgrade (PROTOCOL §2): which requests may become a session, and
which of the agent API's HTTP requests (:mod:`~hostlink_tw.controlplane.agentapi`)
are an agent's: both are judged by the same rules, against the same replay
memory, so a nonce used on one is refused on the other.

:class:`UpgradeAuthenticator` checks the four signed headers in a fixed
order (present; agent id, timestamp and nonce well formed; timestamp within
``max_skew`` of our clock; agent known; signature valid; nonce not seen
inside the window; the agent's quota and the cache not full) and either
raises :class:`UpgradeRefusedError` with the HTTP status and the short reason the
peer reads, or returns the agent's :class:`Credentials`.
:meth:`UpgradeAuthenticator.commit` then remembers the nonce: in memory at
once (so a concurrent replay is refused), and in the SQLite file before the
upgrade is answered, so a restart cannot accept it again.

:class:`ConnectionAttempt` is one verdict as the test layer keeps it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from twisted.internet.defer import Deferred

from hostlink_tw.controlplane.agents import AuthorizedAgents
from hostlink_tw.controlplane.replay import NonceCache, NonceStore, valid_nonce
from hostlink_tw.wire.signing import verify_signature
from hostlink_tw.wire.vocabulary import (
    HEADER_AGENT_ID,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    agent_id_problem,
)

__all__ = [
    "ConnectionAttempt",
    "Credentials",
    "UpgradeAuthenticator",
    "UpgradeRefusedError",
]

# Go's strconv.ParseInt syntax for the timestamp: ASCII digits, optional sign.
_TIMESTAMP = re.compile(r"[+-]?[0-9]{1,19}", re.ASCII)
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?", re.ASCII)
# The longest header value a ConnectionAttempt keeps: anyone can send
# upgrades, so what is kept of them must be bounded.
_ATTEMPT_VALUE_KEPT = 256


@dataclass(frozen=True)
class ConnectionAttempt:
    """
    One upgrade attempt as the control plane judged it (kept in memory for
    tests; never logged, as it holds the nonce).

    :ivar status: 101 when accepted, else the HTTP status of the refusal.
    """

    at: float
    remote: str
    path: str
    agent_id: str | None
    timestamp: str | None
    nonce: str | None
    status: int
    reason: str

    @property
    def accepted(self) -> bool:
        """True if the upgrade was accepted."""
        return self.status == 101

    @classmethod
    def judged(
        cls,
        headers: Mapping[str, str],
        *,
        at: float,
        remote: str,
        path: str,
        status: int,
        reason: str,
    ) -> ConnectionAttempt:
        """The attempt of a request with these (lower-cased) headers, values cut short."""
        return cls(
            at=at,
            remote=remote,
            path=path,
            agent_id=_kept(headers.get(HEADER_AGENT_ID.lower())),
            timestamp=_kept(headers.get(HEADER_TIMESTAMP.lower())),
            nonce=_kept(headers.get(HEADER_NONCE.lower())),
            status=status,
            reason=reason,
        )


def _kept(value: str | None) -> str | None:
    return None if value is None else value[:_ATTEMPT_VALUE_KEPT]


class UpgradeRefusedError(Exception):
    """The upgrade is refused with this HTTP status; ``reason`` is what the peer reads."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Credentials:
    """An upgrade that passed every check: who signed it, with which nonce, when."""

    agent_id: str
    nonce: str
    signed_at: float
    #: Our clock when it was checked.
    now: float


class UpgradeAuthenticator:
    """The rules of the signed upgrade, and the replay memory they fill."""

    def __init__(
        self,
        agents: AuthorizedAgents,
        nonces: NonceCache,
        store: NonceStore | None,
        clock: Callable[[], float],
        max_skew: float,
    ) -> None:
        """
        :param store: Where accepted nonces are written before the upgrade
            is answered; None: memory only.
        :param clock: Wall-clock Unix time (the timestamps' clock).
        """
        self._agents = agents
        self._nonces = nonces
        self._store = store
        self._clock = clock
        self._max_skew = max_skew

    def check(self, headers: Mapping[str, str], *, kind: str = "upgrades") -> Credentials:
        """
        Judge a signed request (an upgrade, or an agent API call) by its
        (lower-cased) headers.

        :param kind: What the request is, in the plural, for the quota's
            refusal ("too many upgrades from this agent").
        :raises UpgradeRefusedError: 401 for a missing, malformed, stale,
            unknown, unverifiable or replayed request; 429 when the agent
            has used its quota of signed requests inside the window; 503 when the
            replay memory is full.
        """
        agent_id = headers.get(HEADER_AGENT_ID.lower(), "")
        timestamp = headers.get(HEADER_TIMESTAMP.lower(), "")
        nonce = headers.get(HEADER_NONCE.lower(), "")
        signature = headers.get(HEADER_SIGNATURE.lower(), "")
        for name, value in (
            (HEADER_AGENT_ID, agent_id),
            (HEADER_TIMESTAMP, timestamp),
            (HEADER_NONCE, nonce),
            (HEADER_SIGNATURE, signature),
        ):
            if not value:
                raise UpgradeRefusedError(401, f"missing {name} header")
        problem = agent_id_problem(agent_id)  # the one rule (protocol.AGENT_ID_RULE)
        if problem is not None:
            raise UpgradeRefusedError(401, f"malformed {HEADER_AGENT_ID} header: {problem}")
        if not _TIMESTAMP.fullmatch(timestamp):
            raise UpgradeRefusedError(401, f"malformed {HEADER_TIMESTAMP} header")
        if not valid_nonce(nonce):
            raise UpgradeRefusedError(
                401, f"malformed {HEADER_NONCE} header (must be base64 of 16 bytes)"
            )
        now = self._clock()
        signed_at = int(timestamp)
        if abs(now - signed_at) > self._max_skew:
            raise UpgradeRefusedError(401, "timestamp outside the allowed window")
        public_key = self._agents.get(agent_id)
        if public_key is None:
            raise UpgradeRefusedError(401, "unknown agent")
        if not _BASE64.fullmatch(signature):
            raise UpgradeRefusedError(401, f"malformed {HEADER_SIGNATURE} header (bad base64)")
        if not verify_signature(public_key, agent_id, timestamp, nonce, signature):
            raise UpgradeRefusedError(401, "invalid signature")
        if self._nonces.seen(agent_id, nonce, now):
            raise UpgradeRefusedError(401, "replayed nonce")
        if self._nonces.over_quota(agent_id, now):
            raise UpgradeRefusedError(429, f"too many {kind} from this agent, try again later")
        if self._nonces.full(now):
            raise UpgradeRefusedError(503, "replay cache full, try again later")
        return Credentials(agent_id, nonce, float(signed_at), now)

    def commit(self, credentials: Credentials) -> Deferred[None] | None:
        """
        Remember the nonce of an accepted request: in memory now, then on
        disk.

        :returns: None without a store; else a Deferred that fires once the
            nonce is committed (and fails if it cannot be).
        """
        expires = self._nonces.add(credentials.agent_id, credentials.nonce, credentials.signed_at)
        if self._store is None:
            return None
        return self._store.record(credentials.agent_id, credentials.nonce, expires, credentials.now)

    def detach_store(self) -> NonceStore | None:
        """Stop writing to the store and hand it over (to be closed by the caller)."""
        store, self._store = self._store, None
        return store
