"""
The agent's identity under the import path it has always had.

The code lives by audience now:

* :mod:`hostlink_tw.agent.identity` — what the agent runs on: loading
  ``agent.json`` (:func:`load_agent_state`) and the private key
  (:func:`load_private_key`), the default key path, permission warnings;
* :mod:`hostlink_tw.provisioning` — making an identity: key generation and
  the atomic writes ``hostlink-tw init`` and the demo use;
* :mod:`hostlink_tw.wire.keys` — public keys (base64 PKIX, PEM) as the
  control plane and the verifier read them, :data:`MIN_RSA_BITS`, and
  :class:`IdentityError`, the one error type (its ``kind`` replaces the
  former subclasses: ``AgentStateMissingError`` is
  ``IdentityErrorKind.AGENT_STATE_MISSING``, and so on);
* :mod:`hostlink_tw.wire.vocabulary` — :func:`check_agent_id`.
"""

from hostlink_tw.agent.identity import (
    AGENT_STATE_FILENAME,
    GO_DEFAULT_PRIVATE_KEY_PATH,
    PRIVATE_KEY_FILENAME,
    AgentState,
    agent_state_file,
    default_private_key_path,
    load_agent_state,
    load_private_key,
)
from hostlink_tw.provisioning import (
    generate_private_key,
    new_private_key,
    write_agent_state,
    write_identity,
)
from hostlink_tw.wire.keys import (
    MIN_RSA_BITS,
    IdentityError,
    IdentityErrorKind,
    load_public_key,
    public_key_base64,
    public_key_pem,
)
from hostlink_tw.wire.vocabulary import check_agent_id

__all__ = [
    "AGENT_STATE_FILENAME",
    "GO_DEFAULT_PRIVATE_KEY_PATH",
    "MIN_RSA_BITS",
    "PRIVATE_KEY_FILENAME",
    "AgentState",
    "IdentityError",
    "IdentityErrorKind",
    "agent_state_file",
    "check_agent_id",
    "default_private_key_path",
    "generate_private_key",
    "load_agent_state",
    "load_private_key",
    "load_public_key",
    "new_private_key",
    "public_key_base64",
    "public_key_pem",
    "write_agent_state",
    "write_identity",
]
