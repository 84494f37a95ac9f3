"""
The wire code both sides share: what travels between an agent and the
control plane, and nothing about either side's state.

* :mod:`hostlink_tw.wire.vocabulary` — message types, the protocol version,
  the gateway path, header names, close codes and the agent-id rule.
* :mod:`hostlink_tw.wire.errors` — :class:`~hostlink_tw.wire.errors.ProtocolError`
  and its codes.
* :mod:`hostlink_tw.wire.jsontext` — JSON text from peers, parsed as if
  hostile.
* :mod:`hostlink_tw.wire.payloads` — the typed payloads (``ack``, ``error``,
  ``task.output``, ``task.final``).
* :mod:`hostlink_tw.wire.tasks` — the payloads of phase 2 (tasks over the
  session): ``task.deliver``, builders for output and finals, message ids;
  it re-exports :mod:`hostlink_tw.wire.hello` (the ``agent.hello`` snapshot
  and the ``agent.hello_ack`` directives).
* :mod:`hostlink_tw.wire.envelope` — the envelope: building, serialising,
  parsing, validating; message ids and ``sent_at``.
* :mod:`hostlink_tw.wire.keys` — RSA public keys as the control plane stores
  them, and :class:`~hostlink_tw.wire.keys.IdentityError`, the one error for
  an identity (state file, key) that cannot be used.
* :mod:`hostlink_tw.wire.signing` — the signed headers of every
  authenticated request: signing (agent) and verifying (control plane).

:mod:`hostlink_tw.protocol` and :mod:`hostlink_tw.signing` re-export these
under their old names.
"""
