"""
One connection attempt: what it has seen, and how it handles its connection.

An :class:`Attempt` is created when the factory starts connecting and is the
``owner`` its :class:`~hostlink_tw.agent.connection.HostlinkClientProtocol`
reports to (the :class:`~hostlink_tw.agent.connection.ConnectionOwner`
interface): the upgrade refused, opened, a frame, a pong, closing, lost.  It
starts and owns the attempt's deadlines (handshake, hello, close; the
keepalive), says hello, validates every inbound frame, creates the
:class:`~hostlink_tw.agent.session.Session` on the matching hello_ack and,
when the factory reports the end, classifies why it ended
(:meth:`Attempt.finish`).  A connection of an attempt that is over reports
to an attempt that ignores it: a late event can never touch the next one.

State and events belong to the client (:class:`AttemptHost`); the attempt
moves the state machine through the host and emits through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from hostlink_tw.agent.connection import MAX_FRAMES_PER_MESSAGE, MAX_UNSENT_BYTES
from hostlink_tw.agent.diagnosis import end_reason, shorten_body
from hostlink_tw.agent.events import (
    Connected,
    EndReason,
    MessageIn,
    MessageOut,
    PingSent,
    PongReceived,
)
from hostlink_tw.agent.interfaces import AttemptHost
from hostlink_tw.agent.keepalive import Keepalive
from hostlink_tw.agent.machine import ClientState, cancel_call
from hostlink_tw.agent.session import (
    CLOSE_INVALID_PAYLOAD,
    CLOSE_NORMAL,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_DATA,
    FRAME_PREVIEW_CHARS,
    Session,
    ViolationError,
    violation_for,
)
from hostlink_tw.protocol import (
    ACK,
    AGENT_HELLO,
    AGENT_HELLO_ACK,
    ERROR,
    TASK_DELIVER,
    Envelope,
    ErrorPayload,
    ProtocolError,
    make_envelope,
    parse_envelope,
)
from hostlink_tw.safetext import escape_control

if TYPE_CHECKING:
    from hostlink_tw.agent.connection import HostlinkClientProtocol

__all__ = ["Attempt", "preview"]

S = ClientState

#: How long one message may take to arrive, from its first frame to its last.
MAX_MESSAGE_SECONDS = 60.0


def preview(payload: bytes) -> str:
    """The first :data:`FRAME_PREVIEW_CHARS` characters of a frame, quoted."""
    text = payload[: FRAME_PREVIEW_CHARS * 4].decode("utf-8", "replace")
    return repr(text[:FRAME_PREVIEW_CHARS])


def _retryable(envelope: Envelope) -> ErrorPayload | None:
    """The payload of an ``error`` that says ``retryable: true``, else None."""
    try:
        error = ErrorPayload.from_dict(envelope.payload)
    except ProtocolError:
        return None
    return error if error.retryable else None


class Attempt:
    """
    One connection attempt, from the factory's ``startedConnecting`` to its
    ``clientConnectionFailed``/``clientConnectionLost``.

    :ivar number: the attempt's number since the last active session.
    :ivar end: the first reason the attempt ends (later ones are consequences).
    :ivar refused_status: the HTTP status of a refused upgrade.
    :ivar upgraded: whether the WebSocket upgrade succeeded.
    :ivar activated: whether the hello was acked.
    :ivar hello_id: the message id of this connection's hello, once sent.
    :ivar session: the session, once the hello is acked.
    :ivar over: whether the factory reported the end.
    """

    def __init__(self, client: AttemptHost, number: int, connector: Any) -> None:
        self.client = client
        self.number = number
        self.connector = connector
        self.proto: HostlinkClientProtocol | None = None
        self.end: EndReason | None = None
        self.refused_status: int | None = None
        self.upgraded = False
        self.activated = False
        self.hello_id: str | None = None
        self.session: Session | None = None
        self.over = False
        #: Whether TCP connected (the attempt then ended in TLS or the upgrade).
        self.tcp_connected = False
        self.failure: BaseException | None = None
        #: When the session became active (reactor time).
        self.activated_at: float | None = None
        #: Whether activation left the backoff as it was (sessions replaced).
        self.backoff_kept = False
        self._rejecting = False
        self._close_timer = False
        self._lost: Failure | None = None
        self._keepalive: Keepalive | None = None
        self._assembly: IDelayedCall | None = None
        self._message_started: float | None = None

    def note(self, kind: str, text: str, **more: Any) -> None:
        """Remember why the attempt ends, unless a reason is known already."""
        if self.end is None:
            self.end = EndReason(kind, text, **more)

    @property
    def _log(self) -> Logger:
        return self.client.log

    @property
    def _fields(self) -> dict[str, Any]:
        return self.client.log_fields()

    def _mine(self, proto: HostlinkClientProtocol) -> bool:
        return not self.over and self.proto is proto

    # -- the client's commands -------------------------------------------------------

    def begin(self) -> None:
        """The attempt starts: its handshake deadline runs while it connects."""
        call = self.client.clock.callLater(
            self.client.settings.handshake_timeout, self._handshake_timed_out
        )
        self.client.machine.own(cancel_call(call), {S.CONNECTING})

    def stop(self) -> None:
        """The client is stopping: close the WebSocket, or abort a connection being set up."""
        if self.proto is not None:
            self.proto.close(CLOSE_NORMAL, "agent stopping")
            self._own_close_timer()

    def setup_failed(self, step: str, error: BaseException) -> None:
        """Our own code raised in ``step``: log one line; the attempt ends with it."""
        if step == "signing the upgrade request":
            text = f"cannot sign the upgrade request: {error}"
            self._log.error(
                "cannot sign the upgrade request: {error} agent_id={agent_id} url={url}",
                error=str(error),
                **self._fields,
            )
        elif step == "connecting":
            text = f"cannot connect: {error}"
            self._log.error(
                "cannot connect: {error} agent_id={agent_id} url={url}",
                error=str(error),
                **self._fields,
            )
        else:
            text = f"{step} failed: {type(error).__name__}: {error}"
            self._log.error(
                "ending this attempt: {reason} agent_id={agent_id} url={url}",
                reason=text,
                **self._fields,
            )
        self.note("setup_error", text)

    def abandon_connect(self, reason: str) -> None:
        """End an attempt that has no connection yet: stop the connector, or end it here."""
        try:
            self.connector.stopConnecting()
        except Exception:  # noqa: BLE001 - e.g. NotConnectingError: already over
            self._log.debug("stopConnecting failed")
        if not self.over:
            # The connector did not report the end (it was not connecting):
            # report it as RCF's loop would hear it.
            self.client.report_connect_failed(
                self.connector, Failure(ConnectError(string=reason))  # type: ignore[no-untyped-call]
            )

    # -- the connection's reports (ConnectionOwner) ----------------------------------

    def sign_upgrade(self) -> Mapping[str, str]:
        """Fresh signed headers for this connection's upgrade."""
        return self.client.sign_upgrade()

    def proxy_authorization(self) -> str | None:
        """The ``Proxy-Authorization`` value for CONNECT, if the proxy has credentials."""
        return self.client.proxy_authorization()

    def connection_made(self, proto: HostlinkClientProtocol) -> None:
        """TCP is up."""
        if not self.over:
            self.proto = proto
            self.tcp_connected = True

    def hook_failed(self, proto: HostlinkClientProtocol, step: str, error: BaseException) -> None:
        """Our own code raised in one of the connection's hooks."""
        if self._mine(proto) or (not self.over and self.proto is None):
            with self.client.handling():
                self.setup_failed(step, error)

    def write_blocked(self, proto: HostlinkClientProtocol, unsent: int) -> None:
        """The peer stopped reading and we would queue more than the bound."""
        if not self._mine(proto):
            return
        with self.client.handling():
            # The protocol aborts the connection itself (it must queue nothing more).
            self._give_up(
                "protocol",
                f"the control plane stopped reading: {unsent} bytes queued "
                f"(limit {MAX_UNSENT_BYTES})",
                "aborting connection: {reason} agent_id={agent_id} url={url}",
            )

    def message_begun(self, proto: HostlinkClientProtocol) -> None:
        """
        A message starts arriving: it must be complete within the bound.
        Cheap per message: the start time is noted, and one check runs at
        most every :data:`MAX_MESSAGE_SECONDS` while messages arrive
        (opened() tied its cancellation to the open states, once).
        """
        if not self._mine(proto):
            return
        self._message_started = self.client.clock.seconds()
        if self._assembly is None and self.client.machine.state in (S.AWAITING_ACK, S.ACTIVE):
            self._assembly = self.client.clock.callLater(
                MAX_MESSAGE_SECONDS, self._assembly_check
            )

    def message_done(self, proto: HostlinkClientProtocol) -> None:
        """The message is complete."""
        if self._mine(proto):
            self._message_started = None

    def too_many_frames(self, proto: HostlinkClientProtocol, frames: int) -> None:
        """A message came in more frames than the bound."""
        if not self._mine(proto):
            return
        with self.client.handling():
            self._cancel_assembly()
            self._reject(
                ViolationError(
                    "message too fragmented",
                    f"more than {MAX_FRAMES_PER_MESSAGE} frames in one message",
                    CLOSE_TOO_BIG,
                    None,
                ),
                b"",
            )

    def _cancel_assembly(self) -> None:
        if self._assembly is not None and self._assembly.active():
            self._assembly.cancel()
        self._assembly = None

    def _assembly_check(self) -> None:
        self._assembly = None
        started = self._message_started
        if self.over or self.proto is None or started is None:
            return
        remaining = started + MAX_MESSAGE_SECONDS - self.client.clock.seconds()
        if remaining > 0:
            self._assembly = self.client.clock.callLater(remaining, self._assembly_check)
            return
        with self.client.handling():
            reason = f"a message was not complete within {MAX_MESSAGE_SECONDS:g}s"
            self._give_up(
                "protocol", reason, "aborting connection: {reason} agent_id={agent_id} url={url}"
            )
            self.proto.abort(reason)

    def bad_head(self, proto: HostlinkClientProtocol, reason: str, data: bytes) -> None:
        """An HTTP response head we refuse to parse (too large, or unparsable)."""
        if not self._mine(proto):
            return
        self._log.warn(
            "{reason} response={preview} agent_id={agent_id} url={url}",
            reason=reason,
            preview=preview(data),
            **self._fields,
        )
        self.note("protocol", reason)

    def proxy_refused(self, proto: HostlinkClientProtocol, reason: str) -> None:
        """The proxy refused the tunnel."""
        if self._mine(proto):
            self.note("refused", f"proxy refused the CONNECT tunnel: {reason}")

    def upgrade_failed(
        self, proto: HostlinkClientProtocol, status: int | None, phrase: str,
        headers: Mapping[str, str], body: bytes, reason: str,
    ) -> None:
        """The upgrade failed: a refusal with its HTTP status, or a broken answer."""
        if not self._mine(proto):
            return
        if status is not None and status != 101:
            self.refused_status = status
            detail = f"HTTP {status} {escape_control(phrase, FRAME_PREVIEW_CHARS)}".strip()
            shown = shorten_body(headers, body)
            if shown:
                detail += f" {shown!r}"
            # A 4xx/5xx is a refusal; anything else (200, a redirect) is a
            # server that is not a Hostlink gateway at this URL.
            verb = "refused" if status >= 400 else "not accepted (expected 101)"
            self.note("refused", f"upgrade {verb}: {detail}", http_status=status)
        else:
            self.note("protocol", f"upgrade failed: {reason}")

    def opened(self, proto: HostlinkClientProtocol) -> None:
        """The upgrade succeeded: start the keepalive and the hello deadline, say hello."""
        if not self._mine(proto):
            return
        client = self.client
        with client.handling():
            self.upgraded = True
            client.connection_opened(client.clock.seconds())
            client.machine.set(S.AWAITING_ACK, "connected")
            settings = client.settings
            keepalive = Keepalive(
                client.clock,
                settings.ping_interval,
                settings.pong_timeout,
                send_ping=proto.send_ping,
                on_ping=lambda n: client.emit(PingSent(sequence=n)),
                on_pong=lambda n: client.emit(PongReceived(sequence=n)),
                on_dead=self._pong_timed_out,
                log=self._log,
            )
            self._keepalive = keepalive
            client.machine.own(keepalive.stop, {S.AWAITING_ACK, S.ACTIVE})
            client.machine.own(self._cancel_assembly, {S.AWAITING_ACK, S.ACTIVE})
            call = client.clock.callLater(settings.hello_timeout, self._hello_timed_out)
            client.machine.own(cancel_call(call), {S.AWAITING_ACK})
            self._log.info(
                "connected to {url}, sending agent.hello attempt={attempt} agent_id={agent_id}",
                attempt=self.number,
                **self._fields,
            )
            client.emit(Connected(attempt=self.number, url=client.display_url))
        # The hello goes out once observers have seen the connection (one of
        # them may have stopped the client).
        if self._mine(proto) and client.machine.state is S.AWAITING_ACK:
            tasks = client.tasks
            if tasks is None:
                self._say_hello(proto, {})
            else:
                # Phase 2: the snapshot is read from the store, off this thread.
                payload = tasks.hello_payload()
                payload.addErrback(self._snapshot_failed)
                payload.addCallback(lambda p: self._say_hello(proto, p))

    def _snapshot_failed(self, failure: Failure) -> dict[str, Any]:
        self._log.failure("cannot build the hello snapshot; saying hello without it", failure)
        return {}

    def _say_hello(self, proto: HostlinkClientProtocol, payload: dict[str, Any]) -> None:
        client = self.client
        if not (self._mine(proto) and client.machine.state is S.AWAITING_ACK):
            return
        with client.handling():
            hello = make_envelope(
                AGENT_HELLO, client.agent_id, payload, now=client.clock.seconds()
            )
            self.hello_id = hello.message_id
            try:
                self.send(hello)
            except Exception as e:  # noqa: BLE001 - e.g. over the message limit
                # The hello deadline ends this attempt; one line, no traceback.
                self._log.error(
                    "cannot send agent.hello: {error} agent_id={agent_id} url={url}",
                    error=f"{type(e).__name__}: {e}", **self._fields,
                )

    def send_if_open(self, envelope: Envelope) -> bool:
        """Send on this connection if it is still the client's open one (a :class:`Channel`)."""
        if self.over or self.proto is None or self._rejecting:
            return False
        if self.client.machine.state not in (S.AWAITING_ACK, S.ACTIVE):
            return False
        self.send(envelope)
        return True

    def write_resumed(self, proto: HostlinkClientProtocol) -> None:
        """The transport drained: a paused bulk sender may go on."""
        if self._mine(proto) and self.session is not None:
            with self.client.handling():
                self.session.drained()

    def send(self, envelope: Envelope) -> None:
        """Write one envelope as a JSON text frame."""
        assert self.proto is not None
        self.proto.send_text(envelope.to_json())
        self.client.emit(MessageOut(type=envelope.type, message_id=envelope.message_id))

    def message(self, proto: HostlinkClientProtocol, payload: bytes, is_binary: bool) -> None:
        """
        Validate and dispatch one inbound message.  Nothing a frame contains
        may raise out of here: any problem ends the connection (and the
        client reconnects), with one log line saying why.
        """
        if not self._mine(proto) or self._rejecting:
            return  # we are closing; the rest is noise
        with self.client.handling():
            try:
                self._handle(payload, is_binary)
            except ViolationError as v:
                self._reject(v, payload)
            except Exception as e:  # noqa: BLE001 - a frame must never crash the agent
                self._reject(
                    ViolationError("cannot handle frame", f"{type(e).__name__}: {e}",
                                   CLOSE_INVALID_PAYLOAD, None),
                    payload,
                )

    def _handle(self, payload: bytes, is_binary: bool) -> None:
        if is_binary:
            raise ViolationError(
                "binary frame", "the protocol uses text frames only", CLOSE_UNSUPPORTED_DATA, None
            )
        try:
            envelope = parse_envelope(payload, self.client.agent_id)
        except ProtocolError as e:
            raise ViolationError("invalid envelope", str(e), CLOSE_INVALID_PAYLOAD, None) from e
        self.client.emit(MessageIn(type=envelope.type, message_id=envelope.message_id))
        if envelope.type == TASK_DELIVER and self.client.tasks is not None:
            # PROTOCOL §7.3: accepted before and after the hello_ack alike.
            self.client.tasks.delivered(envelope, self)
        elif self.session is not None:
            self.session.handle(envelope)
        elif envelope.type in (AGENT_HELLO_ACK, ACK):
            self.client.ack_received(envelope)
            if envelope.type == AGENT_HELLO_ACK:
                self._hello_acked(envelope)
        elif envelope.type == ERROR and (error := _retryable(envelope)) is not None:
            # §7.5 before the session too: a retryable error keeps the connection.
            self._retryable_error(envelope, error)
        else:
            raise violation_for(envelope)

    def _hello_acked(self, envelope: Envelope) -> None:
        # parse_envelope has validated the ack payload.
        acked_message_id: str = envelope.payload["acked_message_id"]
        if self.client.machine.state is not S.AWAITING_ACK:
            return
        if self.hello_id is None or acked_message_id != self.hello_id:
            self._log.warn(
                "ignoring agent.hello_ack for {acked_message_id}: our hello is {hello_id} "
                "agent_id={agent_id} url={url}",
                acked_message_id=escape_control(acked_message_id, FRAME_PREVIEW_CHARS),
                hello_id=self.hello_id,
                **self._fields,
            )
            return
        self.activated = True
        self.activated_at = self.client.clock.seconds()
        self.session = Session(
            self.hello_id,
            self.send,
            self.client.ack_received,
            hello_ack=envelope,
            # Through the attempt, not the protocol: no cycle holds a dead connection.
            paused=lambda: self.proto is not None and self.proto.paused,
        )
        self.session.on_retryable_error = self._retryable_error
        self.client.session_activated(self, self.session)

    def _retryable_error(self, envelope: Envelope, error: ErrorPayload) -> None:
        # PROTOCOL §7.5: logged, the connection stays (the task engine acts on some codes).
        self._log.warn(
            "control plane reported a retryable error: code={code} message={message!r} "
            "related_message_id={related} agent_id={agent_id} url={url}",
            code=escape_control(error.code, FRAME_PREVIEW_CHARS),
            message=error.message[:FRAME_PREVIEW_CHARS],
            related=escape_control(error.related_message_id or "-", FRAME_PREVIEW_CHARS),
            **self._fields,
        )

    def _reject(self, violation: ViolationError, payload: bytes) -> None:
        """One log line about an offending frame, then close and reconnect."""
        self._rejecting = True
        self.note("protocol", f"{violation.problem}: {violation.detail}")
        self._log.warn(
            "closing connection: {problem} (type={msg_type}, reason={reason}, size={size}) "
            "frame={frame} agent_id={agent_id} url={url}",
            problem=violation.problem,
            msg_type=violation.msg_type,
            reason=violation.detail,
            size=len(payload),
            frame=preview(payload),
            close_code=violation.close_code,
            **self._fields,
        )
        self._closing(f"{violation.problem}: {violation.detail}")
        if self.proto is not None:
            self.proto.close(violation.close_code, violation.problem)

    def pong(self, proto: HostlinkClientProtocol, payload: bytes) -> None:
        """A pong: the keepalive decides whether it answers one of our pings."""
        if self._mine(proto) and self._keepalive is not None:
            with self.client.handling():
                self._keepalive.pong(payload)

    def closing(
        self, proto: HostlinkClientProtocol, code: int | None, reason: str, *, by_agent: bool,
        by_library: bool,
    ) -> None:
        """
        A close frame went out (ours, an answer to the peer's, or Autobahn
        failing the connection): bound the close handshake.
        """
        if not self._mine(proto):
            return
        with self.client.handling():
            if by_library and by_agent and not self._rejecting and self.end is None:
                # Autobahn failing the connection itself: a message over
                # MAX_MESSAGE_BYTES (1009), invalid UTF-8 (1007), a protocol
                # violation (1002).  Its own warning is muted; this is the line.
                self._log.warn(
                    "closing connection: {reason} close_code={close_code} "
                    "agent_id={agent_id} url={url}",
                    reason=reason,
                    close_code=code,
                    **self._fields,
                )
            if code is not None and by_agent:
                self.note("closed_by_agent", f"closed by agent: code={code} reason={reason}",
                          close_code=code)
            self._closing(self.end.text if self.end else "closing")
            self._own_close_timer()

    def peer_closing(self, proto: HostlinkClientProtocol, code: int | None, reason: str) -> None:
        """The peer started the close handshake (its reason is peer text: escaped)."""
        if self._mine(proto):
            self.note(
                "closed_by_peer",
                f"closed by control plane: code={code} "
                f"reason={escape_control(reason, FRAME_PREVIEW_CHARS)}".strip(),
                close_code=code,
            )

    def connection_lost(self, proto: HostlinkClientProtocol, reason: Failure) -> None:
        """The connection is gone; the factory reports the attempt's end next."""
        if self._mine(proto):
            self._lost = reason

    # -- deadlines -------------------------------------------------------------------

    def _own_close_timer(self) -> None:
        if self._close_timer:
            return
        self._close_timer = True
        call = self.client.clock.callLater(self.client.close_timeout, self._close_timed_out)
        self.client.machine.own(cancel_call(call), {S.CLOSING, S.STOPPING})

    def _handshake_timed_out(self) -> None:
        if self.over:
            return
        with self.client.handling():
            proto = self.proto
            if proto is None:
                phase = "name lookup or TCP connect"
            elif getattr(proto, "state", None) == proto.STATE_PROXY_CONNECTING:
                phase = "proxy CONNECT"
            else:
                phase = "TLS handshake or upgrade response"
            # Naming the phase tells an operator a hung resolver from a stalled
            # control plane.
            reason = (
                f"connect and upgrade not done within "
                f"{self.client.settings.handshake_timeout:g}s (stuck in {phase})"
            )
            self._log.warn(
                "giving up this attempt: {reason} agent_id={agent_id} url={url}",
                reason=reason,
                **self._fields,
            )
            self.note("timeout", reason)
            if proto is not None:
                proto.abort(reason)
            else:
                self.abandon_connect(reason)

    def _hello_timed_out(self) -> None:
        if self.over or self.proto is None:
            return
        with self.client.handling():
            self._give_up(
                "timeout",
                f"no agent.hello_ack within {self.client.settings.hello_timeout:g}s",
                "closing connection: {reason} agent_id={agent_id} url={url}",
            )
            self.proto.close(CLOSE_NORMAL, "hello timeout")

    def _pong_timed_out(self) -> None:
        if self.over or self.proto is None:
            return
        with self.client.handling():
            reason = f"no pong within {self.client.settings.pong_timeout:g}s"
            self._give_up(
                "timeout", reason,
                "aborting connection: {reason} (dead peer) agent_id={agent_id} url={url}",
            )
            # A dead peer will not answer a close frame: abort the TCP connection.
            self.proto.abort(reason)

    def _close_timed_out(self) -> None:
        if self.over or self.proto is None:
            return
        reason = f"close handshake not finished within {self.client.close_timeout:g}s"
        self.note("timeout", reason)
        self.proto.abort(reason)

    def _give_up(self, kind: str, reason: str, line: str) -> None:
        """This attempt ends for ``reason``: one warning ``line``, the end noted, closing."""
        self._log.warn(line, reason=reason, **self._fields)
        self.note(kind, reason)
        self._closing(reason)

    def _closing(self, reason: str) -> None:
        machine = self.client.machine
        if machine.state in (S.CONNECTING, S.AWAITING_ACK, S.ACTIVE):
            machine.set(S.CLOSING, reason)

    # -- the end ---------------------------------------------------------------------

    def finish(self, reason: Failure, *, stopping: bool) -> tuple[EndReason, bool, bool]:
        """
        The factory reported the end: mark the attempt over, end its session
        and say why it ended.

        :returns: the :class:`EndReason`, whether the close was clean, and
            whether TLS failed.
        """
        self.over = True
        if self._lost is not None:
            reason = self._lost  # the protocol saw the TLS failure; the connector did not
        self._lost = None
        end, clean, tls = end_reason(
            self.proto if self.upgraded else None, self.end, reason, self.client.tls_host,
            self.refused_status, stopping=stopping,
        )
        #: What ended it at the transport level (for the client's diagnosis):
        #: the exception only, without the Failure's frames, which reach the
        #: dead connection.
        self.failure = reason.value.with_traceback(None) if reason.value is not None else None
        if self.session is not None:
            self.session.end(end.text)
        # Nothing of the dead connection stays reachable from the attempt.
        self._keepalive = None
        self._cancel_assembly()
        self.proto = None
        return end, clean, tls

