"""
Which agents may connect: agent id → RSA public key.

:func:`parse_agents` checks such a mapping (keys as objects, base64 PKIX DER
or PEM), :func:`load_agents_file` reads the JSON file of one, and
:class:`AuthorizedAgents` is the set in force: the entries given in code
under the file's, re-read on request (what SIGHUP does) and whenever the
file's size, mtime or inode changes (polled).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from hostlink_tw._files import read_regular_file
from hostlink_tw.wire.keys import IdentityError, load_public_key
from hostlink_tw.wire.vocabulary import agent_id_problem

__all__ = ["AgentsFileError", "AuthorizedAgents", "load_agents_file", "parse_agents"]

log = Logger()

# The agents file is a few keys; refusing huge files keeps a mistake cheap.
_MAX_AGENTS_FILE_BYTES = 16 << 20


class AgentsFileError(ValueError):
    """The authorized-agents file (or mapping) cannot be used; the message says why."""


def parse_agents(agents: Mapping[str, object], source: str = "agents") -> dict[str, RSAPublicKey]:
    """
    Check an agent id → public key mapping.

    :param agents: Values are :class:`RSAPublicKey` objects, or text: standard
        base64 of the PKIX DER encoding (what the Go control plane stores)
        or PEM.
    :param source: Names the origin in error messages (a file path).
    :raises AgentsFileError: An id is empty or not a string, or a key cannot
        be parsed.
    """
    if not isinstance(agents, Mapping):
        raise AgentsFileError(
            f"{source}: must be a JSON object mapping agent id to public key, "
            f"not {type(agents).__name__}"
        )
    result: dict[str, RSAPublicKey] = {}
    for agent_id, key in agents.items():
        problem = agent_id_problem(agent_id)
        if problem is not None:
            raise AgentsFileError(f"{source}: agent id {str(agent_id)[:64]!r}: {problem}")
        if isinstance(key, RSAPublicKey):
            result[agent_id] = key
            continue
        if not isinstance(key, str):
            raise AgentsFileError(
                f"{source}: agent {agent_id!r}: the public key must be a string "
                f"(base64 of PKIX DER, or PEM), not {type(key).__name__}"
            )
        try:
            result[agent_id] = load_public_key(key)
        except IdentityError as e:
            raise AgentsFileError(f"{source}: agent {agent_id!r}: {e}") from None
    return result


def load_agents_file(path: str) -> dict[str, RSAPublicKey]:
    """
    Read the authorized-agents file: a JSON object mapping agent id to
    public key (see :func:`parse_agents`).

    The file is opened non-blocking and must be a regular file of at most
    16 MiB (:func:`hostlink_tw._files.read_regular_file`): a FIFO or device at
    the path is refused at once instead of blocking the reactor.

    :raises AgentsFileError: The file is missing, unreadable, not a regular
        file, too large, not JSON, or holds a bad entry; the message names
        the file.
    """
    try:
        data = read_regular_file(path, _MAX_AGENTS_FILE_BYTES)
    except OSError as e:
        raise AgentsFileError(f"{path}: cannot read the agents file: {e.strerror or e}") from None
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise AgentsFileError(f"{path}: not valid JSON: {e}") from None
    return parse_agents(document, source=path)


class AuthorizedAgents:
    """
    The agents in force: those given in code, under those of the agents
    file (the file wins on conflicts).  Open sessions are not this class's
    business: a reload that drops an agent keeps its session.
    """

    def __init__(
        self,
        agents: Mapping[str, RSAPublicKey | str] | None,
        agents_file: str | None,
        reactor: Any,
        reload_interval: float,
    ) -> None:
        """
        :param agents_file: Read now; re-read by :meth:`reload` and, every
            ``reload_interval`` seconds once :meth:`start_polling` is called,
            when it changed (0: never polled).
        :raises AgentsFileError: The mapping or the file is unusable.
        """
        self.path = agents_file
        self._reactor = reactor
        self._reload_interval = reload_interval
        self._static = parse_agents(agents or {})
        self._file: dict[str, RSAPublicKey] = {}
        self._signature: tuple[int, int, int] | None = None
        if agents_file is not None:
            self._file = load_agents_file(agents_file)
            self._signature = self._stat()
        self._agents = {**self._static, **self._file}
        self._poller: LoopingCall | None = None

    def __len__(self) -> int:
        return len(self._agents)

    def get(self, agent_id: str) -> RSAPublicKey | None:
        """The agent's public key, or None if it is not authorized."""
        return self._agents.get(agent_id)

    def snapshot(self) -> dict[str, RSAPublicKey]:
        """A copy of the agents in force."""
        return dict(self._agents)

    def set_static(self, agents: Mapping[str, RSAPublicKey | str]) -> None:
        """Replace the entries given in code (the file's stay on top)."""
        self._static = parse_agents(agents)
        self._agents = {**self._static, **self._file}

    def reload(self) -> bool:
        """
        Re-read the agents file now.  On error the current set is kept and
        the reason logged.

        :returns: True if the new set is in force.
        """
        if self.path is None:
            return False
        self._signature = self._stat()
        try:
            loaded = load_agents_file(self.path)
        except AgentsFileError as e:
            log.error(
                "agents file not reloaded, keeping {count} agents: {error}",
                count=len(self._agents),
                error=str(e),
            )
            return False
        self._file = loaded
        merged = {**self._static, **loaded}
        added = sorted(set(merged) - set(self._agents))
        removed = sorted(set(self._agents) - set(merged))
        self._agents = merged
        log.info(
            "agents file reloaded: {count} agents (added {added}, removed {removed})",
            count=len(merged),
            added=", ".join(added) or "none",
            removed=", ".join(removed) or "none",
        )
        return True

    def poll(self) -> None:
        """Reload the agents file if its size, mtime or inode changed."""
        if self.path is None:
            return
        signature = self._stat()
        if signature != self._signature:
            self.reload()

    def start_polling(self) -> None:
        """Poll the file every ``reload_interval`` seconds (if there is one and it is not 0)."""
        if self.path is None or self._reload_interval <= 0 or self._poller is not None:
            return
        self._poller = LoopingCall(self.poll)
        self._poller.clock = self._reactor
        self._poller.start(self._reload_interval, now=False).addErrback(
            lambda f: log.failure("agents file polling stopped", f)
        )

    def stop_polling(self) -> None:
        """Stop polling (idempotent)."""
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._poller = None

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)
