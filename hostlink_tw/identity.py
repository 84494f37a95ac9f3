"""The agent's identity on disk: its state file and its RSA private key.

PROTOCOL §1 fixes the formats this module reads and writes:

* ``$HOSTLINK_STATE_PATH/agent.json``: a JSON object with ``agent_id``
  (string), optional ``last_sync_time`` (int) and optional ``metadata``
  (object of strings), written with mode 0600, atomically.
* ``$HOSTLINK_PRIVATE_KEY_PATH``: a PEM RSA private key, PKCS#1
  (``RSA PRIVATE KEY``, what the registration step writes) or PKCS#8
  (``PRIVATE KEY``), at least 2048 bits, unencrypted, mode 0600.
* The public key as the control plane stores it: standard base64 of the DER
  SubjectPublicKeyInfo (PKIX) encoding.

Every failure to load is an L{IdentityError} subclass whose message names the
file, says what is wrong with it and how to fix it, so an operator can act on
the log line alone.  No message ever carries key material.

Files are read through an ``O_NONBLOCK`` open followed by ``fstat`` on the
open descriptor (:mod:`hostlink_tw._files`, shared with the CA file reader),
so the checks (regular file, permissions, size) apply to the very file that
is read, and a FIFO left at the path cannot hang the agent.

Everything here is POSIX-only: the permission rules are those of OpenSSH.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import shlex
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn, Union

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from twisted.logger import Logger

from hostlink_tw._files import read_regular_file
from hostlink_tw._json import INT64_MAX, INT64_MIN, json_kind
from hostlink_tw.protocol import agent_id_problem

__all__ = [
    "AGENT_STATE_FILENAME",
    "GO_DEFAULT_PRIVATE_KEY_PATH",
    "MIN_RSA_BITS",
    "PRIVATE_KEY_FILENAME",
    "AgentIdError",
    "AgentState",
    "AgentStateError",
    "AgentStateFieldError",
    "AgentStateJSONError",
    "AgentStateMissingError",
    "AgentStateNotObjectError",
    "AgentStateUnreadableError",
    "IdentityError",
    "IdentityWriteError",
    "PrivateKeyEmptyError",
    "PrivateKeyEncryptedError",
    "PrivateKeyError",
    "PrivateKeyExistsError",
    "PrivateKeyFormatError",
    "PrivateKeyMissingError",
    "PrivateKeyNotRSAError",
    "PrivateKeyPermissionsError",
    "PrivateKeyTooSmallError",
    "PrivateKeyUnreadableError",
    "PublicKeyError",
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

log = Logger()

#: Name of the agent state file inside the state directory.
AGENT_STATE_FILENAME = "agent.json"

#: Name of the private key inside the state directory when
#: C{HOSTLINK_PRIVATE_KEY_PATH} is unset (what C{hostlink-tw init} writes).
PRIVATE_KEY_FILENAME = "agent.key"

#: Where the Go agent keeps its key by default; still used when
#: C{HOSTLINK_PRIVATE_KEY_PATH} is unset and only this file exists (see
#: L{default_private_key_path}).
GO_DEFAULT_PRIVATE_KEY_PATH = "/var/lib/hostlink/agent.key"

#: Smallest RSA modulus this project loads, generates or signs with.
MIN_RSA_BITS = 2048

# Both files are a few kilobytes at most (a 16384-bit PEM key is ~12 KiB);
# the cap keeps a wrong path (a log file, /dev/zero behind a symlink) from
# being read into memory whole.
_MAX_FILE_BYTES = 1 << 20

# Go's json.Unmarshal into an int64 rejects anything outside this range.

_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_PEM_BLOCK = re.compile(
    rb"-----BEGIN (?P<label>[A-Z0-9 ]+)-----.*?-----END (?P=label)-----", re.DOTALL
)

PublicKeySource = Union[RSAPrivateKey, RSAPublicKey]


# --------------------------------------------------------------------------
# Exceptions


class IdentityError(Exception):
    """
    The agent's identity (state file or key) cannot be used.

    The message names the file (when there is one), what is wrong with it and
    the fix; the parts are also available as attributes.

    @ivar problem: What is wrong, naming the file.
    @ivar path: The file concerned, or L{None} (a key given as text).
    @ivar fix: What the operator should do about it.
    """

    def __init__(self, problem: str, *, path: str | None = None, fix: str = "") -> None:
        self.problem = problem
        self.path = path
        self.fix = fix
        super().__init__(f"{problem}. Fix: {fix}" if fix else problem)


class IdentityWriteError(IdentityError):
    """Writing the state file or the private key failed (an L{OSError})."""


class AgentStateError(IdentityError):
    """The agent state file (C{agent.json}) is missing or unusable."""


class AgentStateMissingError(AgentStateError):
    """The agent state file does not exist: the agent is not registered."""


class AgentStateUnreadableError(AgentStateError):
    """The agent state file exists but cannot be read (permissions, a directory...)."""


class AgentStateJSONError(AgentStateError):
    """The agent state file is not valid UTF-8 JSON."""


class AgentStateNotObjectError(AgentStateError):
    """The agent state file holds valid JSON that is not an object."""


class AgentStateFieldError(AgentStateError):
    """An optional field (C{last_sync_time}, C{metadata}) has the wrong type."""


class AgentIdError(AgentStateError):
    """C{agent_id} is missing, empty, not a string or not usable in a header."""


class PrivateKeyError(IdentityError):
    """The private key file is missing or unusable."""


class PrivateKeyMissingError(PrivateKeyError):
    """The private key file does not exist."""


class PrivateKeyUnreadableError(PrivateKeyError):
    """The private key path exists but cannot be read (permissions, a directory...)."""


class PrivateKeyPermissionsError(PrivateKeyError):
    """Group or others may read or write the key file (OpenSSH refuses these too)."""


class PrivateKeyFormatError(PrivateKeyError):
    """The file is not a PEM private key this project reads (garbage, a public key...)."""


class PrivateKeyEmptyError(PrivateKeyFormatError):
    """The private key file is empty (or only whitespace)."""


class PrivateKeyEncryptedError(PrivateKeyError):
    """The private key is encrypted; the agent runs unattended and has no password."""


class PrivateKeyNotRSAError(PrivateKeyError):
    """The private key is not RSA (EC, Ed25519, DSA...)."""


class PrivateKeyTooSmallError(PrivateKeyError):
    """The RSA key has fewer than L{MIN_RSA_BITS} bits."""


class PrivateKeyExistsError(PrivateKeyError):
    """L{generate_private_key} was told not to overwrite, and the file exists."""


class PublicKeyError(IdentityError):
    """Text given as a public key is neither PKIX base64 nor a PEM RSA public key."""


# --------------------------------------------------------------------------
# Agent state


@dataclass(frozen=True)
class AgentState:
    """
    The contents of C{agent.json}.

    Constructing one validates it with the rules L{load_agent_state} applies,
    so whatever L{write_agent_state} writes loads again.  C{metadata} is
    stored as a read-only mapping.

    @ivar agent_id: The id the control plane gave this agent at registration.
    @ivar last_sync_time: Unix seconds of the last sync, or L{None}.
    @ivar metadata: Free-form string labels.
    """

    agent_id: str
    last_sync_time: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_agent_id(self.agent_id)
        problem = _last_sync_time_problem(self.last_sync_time)
        if problem is not None:
            raise ValueError(problem)
        problem = _metadata_problem(self.metadata)
        if problem is not None:
            raise ValueError(problem)
        # Frozen means frozen: a caller keeping a reference to the dict it
        # passed in must not be able to change the state behind our back.
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    def to_json_object(self) -> dict[str, Any]:
        """
        The JSON object written to C{agent.json}; absent optional fields are
        omitted.
        """
        obj: dict[str, Any] = {"agent_id": self.agent_id}
        if self.last_sync_time is not None:
            obj["last_sync_time"] = self.last_sync_time
        if self.metadata:
            obj["metadata"] = dict(self.metadata)
        return obj


def check_agent_id(value: object) -> str:
    """
    Check that C{value} is an agent id and return it.

    The rule is L{hostlink_tw.protocol.AGENT_ID_RULE} (1 to 256 characters
    of C{A-Z a-z 0-9 . _ : @ -}), defined once for the agent, C{init} and
    the control plane: anything else could never authenticate (HTTP header
    decoding, length limits) or would silence logging (lone surrogates).

    @raise ValueError: With a description of the problem that ends with the
        rule.
    """
    problem = agent_id_problem(value)
    if problem is not None:
        raise ValueError(problem)
    assert isinstance(value, str)
    return value


def agent_state_file(state_path: str) -> str:
    """The path of C{agent.json} inside the state directory C{state_path}."""
    return os.path.join(state_path, AGENT_STATE_FILENAME)


def default_private_key_path(state_path: str, logger: Logger | None = None) -> str:
    """
    The private key path when C{HOSTLINK_PRIVATE_KEY_PATH} is unset.

    C{$HOSTLINK_STATE_PATH/agent.key}, where C{hostlink-tw init} writes it,
    so the two agree for any state directory.  For agents migrating from the
    Go agent's layout (a key at L{GO_DEFAULT_PRIVATE_KEY_PATH} next to a
    state directory elsewhere): when C{state_path/agent.key} does not exist
    but the Go default does, the Go default is used, and that choice is
    logged.  When neither exists, C{state_path/agent.key} (what the error
    message will name, and what C{init} creates).

    @param logger: Where the choice of the Go default is logged (info).
    """
    preferred = os.path.join(state_path, PRIVATE_KEY_FILENAME)
    go_default = GO_DEFAULT_PRIVATE_KEY_PATH
    if os.path.lexists(preferred) or not os.path.lexists(go_default):
        return preferred
    if os.path.abspath(preferred) != os.path.abspath(go_default):
        (logger or log).info(
            "HOSTLINK_PRIVATE_KEY_PATH is unset and {preferred} does not exist: "
            "using the Go agent's key at {path}",
            preferred=preferred,
            path=go_default,
        )
    return go_default


def load_agent_state(state_path: str) -> AgentState:
    """
    Load C{agent.json} from the state directory C{state_path}.

    Go-compatible typing (PROTOCOL §1): C{last_sync_time} must be a JSON
    integer within int64 (a float such as C{1.0}, a string or a boolean is
    refused, as Go's decoder refuses them); C{metadata} must be an object of
    strings.  C{null} for either means absent.  Unknown keys are ignored, as
    Go ignores them.  Key names are matched exactly.

    @param state_path: The state I{directory} (C{HOSTLINK_STATE_PATH}).
    @raise AgentStateMissingError: No such file: the agent is not registered.
    @raise AgentStateUnreadableError: Permission denied, a directory, too big...
    @raise AgentStateJSONError: Not UTF-8, not JSON, or C{NaN}/C{Infinity}.
    @raise AgentStateNotObjectError: Valid JSON but not an object.
    @raise AgentIdError: C{agent_id} missing, empty or not a usable string.
    @raise AgentStateFieldError: A wrongly typed optional field.
    """
    path = agent_state_file(state_path)
    register_fix = (
        f"create this agent's identity with 'hostlink-tw init --state-path {state_path}' "
        "(it writes agent.json and the key), or set HOSTLINK_STATE_PATH to the directory "
        "that holds agent.json"
    )
    try:
        data = _read_small_file(path, check_mode=_warn_if_writable_by_others)
    except FileNotFoundError:
        raise AgentStateMissingError(
            f"agent state file {path} does not exist (this agent has no identity yet)",
            path=path,
            fix=register_fix,
        ) from None
    except NotADirectoryError:
        raise AgentStateUnreadableError(
            f"cannot read agent state file {path}: {state_path} is not a directory",
            path=path,
            fix="set HOSTLINK_STATE_PATH to the directory that holds agent.json, "
            "not to the file itself",
        ) from None
    except OSError as e:
        raise AgentStateUnreadableError(
            f"cannot read agent state file {path}: {_describe_os_error(e)}",
            path=path,
            fix=_unreadable_fix(e, path, "a regular file holding the agent state"),
        ) from None

    fix_json = (
        f"restore {path} from a backup, or create a new identity with "
        f"'hostlink-tw init --force --state-path {state_path}'"
    )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AgentStateJSONError(
            f"agent state file {path} is not UTF-8 text", path=path, fix=fix_json
        ) from None
    if not text.strip():
        raise AgentStateJSONError(f"agent state file {path} is empty", path=path, fix=fix_json)
    try:
        obj = json.loads(text, parse_constant=_refuse_json_constant)
    except (ValueError, RecursionError) as e:
        # JSONDecodeError is a ValueError; its text gives line and column.
        raise AgentStateJSONError(
            f"agent state file {path} is not valid JSON ({_json_error_text(e)})",
            path=path,
            fix=fix_json,
        ) from None
    if not isinstance(obj, dict):
        raise AgentStateNotObjectError(
            f"agent state file {path} holds {json_kind(obj)}, "
            f"not a JSON object with an agent_id",
            path=path,
            fix=fix_json,
        )

    if "agent_id" not in obj:
        raise AgentIdError(
            f"agent state file {path} has no agent_id (this agent has no identity yet)",
            path=path,
            fix=register_fix,
        )
    try:
        agent_id = check_agent_id(obj["agent_id"])
    except ValueError as e:
        # The message ends with the rule (protocol.AGENT_ID_RULE).
        raise AgentIdError(
            f"agent state file {path}: {e}",
            path=path,
            fix=(
                f"set agent_id in {path} to the id the control plane knows this agent by "
                "(within the rule)"
                if isinstance(obj["agent_id"], str) and obj["agent_id"]
                else register_fix
            ),
        ) from None

    last_sync_time = obj.get("last_sync_time")
    problem = _last_sync_time_problem(last_sync_time)
    if problem is not None:
        raise AgentStateFieldError(
            f"agent state file {path}: {problem}",
            path=path,
            fix="correct or remove last_sync_time (an integer of Unix seconds)",
        )
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    problem = _metadata_problem(metadata)
    if problem is not None:
        raise AgentStateFieldError(
            f"agent state file {path}: {problem}",
            path=path,
            fix="correct or remove metadata (an object whose values are strings)",
        )
    _warn_if_directory_writable_by_others(state_path)
    return AgentState(agent_id=agent_id, last_sync_time=last_sync_time, metadata=metadata)


def _warn_if_writable_by_others(path: str, st: os.stat_result) -> None:
    # Not refused (the Go agent reads such files too), but whoever can write
    # agent.json can make this agent claim another agent's id.
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        log.warn(
            "agent state file {path} is writable by group or others (mode {mode}); "
            "fix: chmod go-w {quoted}",
            path=path,
            mode=f"{mode:04o}",
            quoted=shlex.quote(path),
        )


def _warn_if_directory_writable_by_others(directory: str) -> None:
    # Whoever can write the directory can replace agent.json (and the key,
    # when it lives there) by renaming another file over it.
    try:
        st = os.stat(directory)
    except OSError:
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        log.warn(
            "state directory {path} is writable by group or others (mode {mode}); "
            "fix: chmod go-w {quoted}",
            path=directory,
            mode=f"{mode:04o}",
            quoted=shlex.quote(directory),
        )


def write_agent_state(state_path: str, state: AgentState) -> str:
    """
    Write C{state} to C{agent.json} in the directory C{state_path}.

    The file is written atomically (a temporary file in the same directory,
    fsynced, then renamed over the old one) and has mode 0600 from the
    moment it exists, whatever the umask.  The directory is created with mode
    0700 if missing.

    @return: The path of the file written.
    @raise IdentityWriteError: The directory or file cannot be written.
    """
    path = agent_state_file(state_path)
    _write_file_atomically(path, _state_bytes(state), what="agent state file", overwrite=True)
    return path


def _state_bytes(state: AgentState) -> bytes:
    return (json.dumps(state.to_json_object(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _last_sync_time_problem(value: object) -> str | None:
    if value is None:
        return None
    # bool is an int in Python but true/false in JSON; Go refuses both.
    if isinstance(value, float):
        # Go's decoder refuses 1.0 and 1e9 for an int64 field too.
        return f"last_sync_time is {value!r}, not an integer (no fraction or exponent)"
    if isinstance(value, bool) or not isinstance(value, int):
        return f"last_sync_time is {json_kind(value)}, not an integer"
    if not INT64_MIN <= value <= INT64_MAX:
        return "last_sync_time is outside the 64-bit integer range"
    return None


def _metadata_problem(value: object) -> str | None:
    if not isinstance(value, Mapping):
        return f"metadata is {json_kind(value)}, not an object"
    for key, item in value.items():
        if not isinstance(key, str):
            return "metadata has a key that is not a string"
        if not isinstance(item, str):
            return f"metadata[{key!r}] is {json_kind(item)}, not a string"
    return None


def _refuse_json_constant(name: str) -> NoReturn:
    # Python's json accepts NaN/Infinity/-Infinity; JSON (and Go) does not.
    raise ValueError(f"{name} is not valid JSON")


def _json_error_text(error: BaseException) -> str:
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error)


# --------------------------------------------------------------------------
# Private key


def load_private_key(path: str) -> RSAPrivateKey:
    """
    Load the agent's RSA private key from the PEM file C{path}.

    Accepted: an unencrypted PEM C{RSA PRIVATE KEY} (PKCS#1) or
    C{PRIVATE KEY} (PKCS#8) block holding an RSA key of at least
    L{MIN_RSA_BITS} bits.  As with Go's C{pem.Decode}, the first PEM block in
    the file is the one used.

    Like OpenSSH, a key file that group or others may read or write is
    refused before it is even read: the fix is C{chmod 600}.

    @raise PrivateKeyMissingError: No such file.
    @raise PrivateKeyUnreadableError: Permission denied, a directory, too big...
    @raise PrivateKeyPermissionsError: Mode allows group or other access.
    @raise PrivateKeyEmptyError: The file is empty.
    @raise PrivateKeyFormatError: Not a PEM private key (garbage, a public key,
        an OpenSSH-format key, a corrupt block).
    @raise PrivateKeyEncryptedError: The key is protected by a password.
    @raise PrivateKeyNotRSAError: EC, Ed25519, DSA or another non-RSA key.
    @raise PrivateKeyTooSmallError: RSA with fewer than 2048 bits.
    """
    regenerate = (
        f"point HOSTLINK_PRIVATE_KEY_PATH at this agent's PEM RSA private key "
        f"(2048 bits or more), or create a new identity with 'hostlink-tw init --force' "
        f"to write {path}"
    )
    try:
        data = _read_small_file(path, check_mode=_check_key_mode)
    except FileNotFoundError:
        raise PrivateKeyMissingError(
            f"private key file {path} does not exist", path=path, fix=regenerate
        ) from None
    except OSError as e:
        raise PrivateKeyUnreadableError(
            f"cannot read private key file {path}: {_describe_os_error(e)}",
            path=path,
            fix=_unreadable_fix(e, path, "the agent's PEM private key file"),
        ) from None

    if not data.strip():
        raise PrivateKeyEmptyError(f"private key file {path} is empty", path=path, fix=regenerate)
    block = _PEM_BLOCK.search(data)
    if block is None:
        begin = _PEM_BEGIN.search(data)
        problem = (
            f"private key file {path} has a BEGIN {begin.group(1).decode()} line "
            f"but no matching END line"
            if begin is not None
            else f"private key file {path} is not a PEM file"
        )
        raise PrivateKeyFormatError(problem, path=path, fix=regenerate)

    label = block.group("label").decode("ascii")
    pem = block.group(0)
    _check_pem_label(path, label, pem, regenerate)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        # cryptography's way of saying "encrypted, and no password given".
        raise _encrypted_key_error(path) from None
    except UnsupportedAlgorithm:
        raise PrivateKeyNotRSAError(
            f"private key file {path} holds a key of an unsupported algorithm, not RSA",
            path=path,
            fix=regenerate,
        ) from None
    except ValueError:
        # The library's message is generic; the PEM label says more.
        raise PrivateKeyFormatError(
            f"private key file {path} holds a {label} block that cannot be decoded "
            f"(corrupt, truncated or not an RSA key)",
            path=path,
            fix=regenerate,
        ) from None
    if not isinstance(key, RSAPrivateKey):
        raise PrivateKeyNotRSAError(
            f"private key file {path} holds {_key_kind(key)}, not an RSA key",
            path=path,
            fix=regenerate,
        )
    if key.key_size < MIN_RSA_BITS:
        raise PrivateKeyTooSmallError(
            f"private key file {path} holds a {key.key_size}-bit RSA key; "
            f"at least {MIN_RSA_BITS} bits are required",
            path=path,
            fix=regenerate,
        )
    return key


def _check_key_mode(path: str, st: os.stat_result) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise PrivateKeyPermissionsError(
            f"private key file {path} is accessible by group or others "
            f"(mode {mode:04o}); it must be readable by its owner only",
            path=path,
            fix=f"chmod 600 {shlex.quote(path)}",
        )
    uid = os.geteuid()
    if st.st_uid != uid:
        # Readable (we are root, or it is ours by group ACL...), but its owner
        # can replace it: the agent should run as the key's owner.
        log.warn(
            "private key file {path} is owned by uid {owner}, not by the user running "
            "the agent (uid {uid}); fix: chown {uid} {quoted}, or run the agent as its owner",
            path=path,
            owner=st.st_uid,
            uid=uid,
            quoted=shlex.quote(path),
        )


def _check_pem_label(path: str, label: str, pem: bytes, regenerate: str) -> None:
    """Explain the PEM labels we refuse better than the library can."""
    if label == "ENCRYPTED PRIVATE KEY":
        raise _encrypted_key_error(path)
    if label == "RSA PRIVATE KEY":
        # Legacy OpenSSL encryption keeps the label and adds PEM headers.
        if b"Proc-Type:" in pem and b"ENCRYPTED" in pem.split(b"\n\n", 1)[0]:
            raise _encrypted_key_error(path)
        return
    if label == "PRIVATE KEY":
        return
    if label in ("EC PRIVATE KEY", "DSA PRIVATE KEY"):
        raise PrivateKeyNotRSAError(
            f"private key file {path} holds an {label.split()[0]} key, not an RSA key",
            path=path,
            fix=regenerate,
        )
    if label == "OPENSSH PRIVATE KEY":
        raise PrivateKeyFormatError(
            f"private key file {path} is in OpenSSH format, not PEM",
            path=path,
            fix=f"convert it with: ssh-keygen -p -N '' -m PEM -f {shlex.quote(path)}",
        )
    raise PrivateKeyFormatError(
        f"private key file {path} holds a {label}, not an RSA private key",
        path=path,
        fix=regenerate,
    )


def _encrypted_key_error(path: str) -> PrivateKeyEncryptedError:
    return PrivateKeyEncryptedError(
        f"private key file {path} is encrypted; the agent runs unattended and "
        f"cannot ask for a password",
        path=path,
        fix=f"store it unencrypted: openssl rsa -in {shlex.quote(path)} -out "
        f"<new file> (then chmod 600 the new file)",
    )


def _key_kind(key: object) -> str:
    # Names only the algorithm (and curve), never anything about the key itself.
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC key ({key.curve.name})"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    if isinstance(key, ed448.Ed448PrivateKey):
        return "an Ed448 key"
    if isinstance(key, dsa.DSAPrivateKey):
        return "a DSA key"
    return f"a {type(key).__name__}"


def generate_private_key(
    path: str, bits: int = MIN_RSA_BITS, *, overwrite: bool = True
) -> RSAPrivateKey:
    """
    Generate an RSA private key and save it at C{path}.

    The file is unencrypted PEM PKCS#1 (C{RSA PRIVATE KEY}, what the Go agent
    writes), created with mode 0600 whatever the umask and moved into place
    atomically, so it is never visible half-written or with wider
    permissions.  The parent directory is created with mode 0700 if missing.

    @param bits: Modulus size; at least L{MIN_RSA_BITS}.
    @param overwrite: If false and C{path} exists, raise
        L{PrivateKeyExistsError} instead of replacing an agent's identity.
    @return: The new key.
    @raise PrivateKeyTooSmallError: C{bits} below L{MIN_RSA_BITS}.
    @raise PrivateKeyExistsError: See C{overwrite}.
    @raise IdentityWriteError: The directory or file cannot be written.
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, not {type(bits).__name__}")
    if bits < MIN_RSA_BITS:
        raise PrivateKeyTooSmallError(
            f"refusing to generate a {bits}-bit RSA key for {path}; "
            f"at least {MIN_RSA_BITS} bits are required",
            path=path,
            fix=f"use bits={MIN_RSA_BITS} or more",
        )
    if not overwrite and os.path.lexists(path):
        raise _key_exists_error(path)
    key = new_private_key(bits)
    pem = _private_key_pem(key)
    try:
        _write_file_atomically(path, pem, what="private key file", overwrite=overwrite)
    except FileExistsError:
        # Lost a race with another writer after the check above.
        raise _key_exists_error(path) from None
    log.info("generated a {bits}-bit RSA private key at {path}", bits=bits, path=path)
    return key


def new_private_key(bits: int = MIN_RSA_BITS) -> RSAPrivateKey:
    """
    A new RSA private key of C{bits} bits (in memory only; see
    L{write_identity} and L{generate_private_key} to save one).

    @raise PrivateKeyTooSmallError: C{bits} below L{MIN_RSA_BITS}.
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, not {type(bits).__name__}")
    if bits < MIN_RSA_BITS:
        raise PrivateKeyTooSmallError(
            f"refusing to generate a {bits}-bit RSA key; at least {MIN_RSA_BITS} bits are required",
            fix=f"use {MIN_RSA_BITS} bits or more",
        )
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _private_key_pem(key: RSAPrivateKey) -> bytes:
    # PKCS#1 "RSA PRIVATE KEY", unencrypted: what the Go agent writes.
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.TraditionalOpenSSL,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _key_exists_error(path: str) -> PrivateKeyExistsError:
    return PrivateKeyExistsError(
        f"private key file {path} already exists; not replacing this agent's key",
        path=path,
        fix="use the existing key, or move it away first if a new identity is intended",
    )


# --------------------------------------------------------------------------
# Public key


def _public(key: PublicKeySource) -> RSAPublicKey:
    if isinstance(key, RSAPrivateKey):
        return key.public_key()
    if isinstance(key, RSAPublicKey):
        return key
    raise TypeError(f"expected an RSA private or public key, not {type(key).__name__}")


def public_key_base64(key: PublicKeySource) -> str:
    """
    The public key as the control plane stores it: standard base64 (with
    padding, no line breaks) of the DER SubjectPublicKeyInfo (PKIX).

    @param key: The agent's private key, or its public key.
    """
    der = _public(key).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def public_key_pem(key: PublicKeySource) -> str:
    """
    The public key as PEM SubjectPublicKeyInfo (C{-----BEGIN PUBLIC KEY-----}).

    @param key: The agent's private key, or its public key.
    """
    return (
        _public(key)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def load_public_key(text: str) -> RSAPublicKey:
    """
    Parse an RSA public key from what a control plane stores or is given.

    Accepted: standard base64 of the PKIX DER (as L{public_key_base64} makes;
    line breaks and surrounding whitespace are ignored, as Go's decoder
    ignores them), or PEM (C{PUBLIC KEY}, or PKCS#1 C{RSA PUBLIC KEY}).  Key
    size is not checked here: this is the verifier's side, and it accepts
    what Go's C{x509.ParsePKIXPublicKey} accepts.

    @raise PublicKeyError: Anything else, including a non-RSA public key.
    """
    if not isinstance(text, str):
        raise PublicKeyError(
            f"public key must be text, not {type(text).__name__}",
            fix="give the base64 of the PKIX DER encoding, or a PEM PUBLIC KEY",
        )
    fix = "give the base64 of the PKIX DER encoding (as stored by the control plane), or PEM"
    stripped = text.strip()
    key: object
    if stripped.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(stripped.encode("utf-8"))
        except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError):
            raise PublicKeyError("PEM text is not a valid public key", fix=fix) from None
    else:
        compact = "".join(stripped.split())
        if not compact:
            raise PublicKeyError("public key is empty", fix=fix)
        try:
            der = base64.b64decode(compact.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise PublicKeyError("public key is neither PEM nor standard base64", fix=fix) from None
        try:
            key = serialization.load_der_public_key(der)
        except (ValueError, UnsupportedAlgorithm):
            raise PublicKeyError(
                "base64 public key does not decode to a PKIX (SubjectPublicKeyInfo) key",
                fix=fix,
            ) from None
    if not isinstance(key, RSAPublicKey):
        raise PublicKeyError(
            f"public key is {type(key).__name__}, not RSA",
            fix="agents sign with RSA keys; give the agent's RSA public key",
        )
    return key


# --------------------------------------------------------------------------
# File helpers


def _read_small_file(
    path: str, check_mode: Callable[[str, os.stat_result], None] | None = None
) -> bytes:
    """
    Read a small regular file with the shared discipline of
    L{hostlink_tw._files.read_regular_file} (non-blocking open, checks on
    the open descriptor), bounded by C{_MAX_FILE_BYTES}.

    @raise OSError: C{FileNotFoundError}, C{PermissionError},
        C{IsADirectoryError}, not a regular file, too large...
    @raise IdentityError: Whatever C{check_mode} raises.
    """
    return read_regular_file(path, _MAX_FILE_BYTES, check_mode)


def _describe_os_error(error: OSError) -> str:
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, IsADirectoryError):
        return "it is a directory"
    return error.strerror or str(error)


def _unreadable_fix(error: OSError, path: str, expected: str) -> str:
    if isinstance(error, PermissionError):
        return (
            f"run the agent as the user that owns {path}, or give that user read "
            f"access to it (and search access to its directories)"
        )
    return f"make {path} {expected}"


def _ensure_private_dir(directory: str) -> None:
    """Create C{directory} and any missing parents with mode 0700."""
    missing: list[str] = []
    current = directory
    while current and not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for new in reversed(missing):
        try:
            os.mkdir(new, 0o700)
        except FileExistsError:
            continue  # Someone else made it meanwhile: not ours to chmod.
        # mkdir's mode is filtered by the umask; make it exactly 0700.
        os.chmod(new, 0o700)


def _write_temp(path: str, data: bytes, *, what: str) -> str:
    """
    Write C{data} to a new temporary file next to C{path}, mode 0600, fsynced.

    The file is created with C{O_EXCL} and mode 0600 (then C{fchmod} to
    exactly 0600, since the umask can only remove bits); the directory is
    created (0700) if missing.

    @return: The temporary file's path; the caller renames or removes it.
    @raise IdentityWriteError: Any L{OSError} (the temporary file is removed).
    """
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    try:
        _ensure_private_dir(directory)
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        _remove_quietly(temp)
        raise _write_error(e, path, what) from None
    return temp


def _write_error(error: OSError, path: str, what: str) -> IdentityWriteError:
    directory = os.path.dirname(os.path.abspath(path))
    return IdentityWriteError(
        f"cannot write {what} {path}: {_describe_os_error(error)}",
        path=path,
        fix=f"make sure {directory} is a writable directory for the user running the agent",
    )


def _rename(source: str, destination: str) -> None:
    # One place for the renames that commit a write, so tests can make the
    # second of two fail (root, as tests often run, ignores read-only modes).
    os.replace(source, destination)


def _write_file_atomically(path: str, data: bytes, *, what: str, overwrite: bool) -> None:
    """
    Write C{data} to C{path} with mode 0600 atomically.

    A temporary file (L{_write_temp}) is renamed over C{path}, or hard-linked
    to it when not C{overwrite}, which fails if C{path} exists.  Readers see
    the old file or the new one, never a partial or world-readable one.

    @raise FileExistsError: C{overwrite} is false and C{path} exists.
    @raise IdentityWriteError: Any other L{OSError}.
    """
    directory = os.path.dirname(os.path.abspath(path))
    temp = _write_temp(path, data, what=what)
    try:
        if overwrite:
            _rename(temp, path)
        else:
            os.link(temp, path)
            os.unlink(temp)
        _fsync_directory(directory)
    except OSError as e:
        _remove_quietly(temp)
        if isinstance(e, FileExistsError) and not overwrite:
            raise
        raise _write_error(e, path, what) from None


def write_identity(
    state_path: str, key_path: str, state: AgentState, key: RSAPrivateKey | None = None
) -> None:
    """
    Write C{agent.json} and, when C{key} is given, the private key, as one
    change: afterwards both files are new, or (on L{IdentityWriteError})
    both are what they were.

    Both are first written to temporary files next to their destinations.
    Then the key is renamed into place, with the old key kept as a hard link,
    and C{agent.json} after it; if that last rename fails (a directory in
    its place, a read-only directory...), the old key is put back (or the new
    one removed when there was none), so a failed C{init --force} never
    leaves a key that the control plane does not know.

    @param key: C{None} writes C{agent.json} only, for a key that exists.
    @raise IdentityWriteError: Nothing was changed.
    """
    state_file = agent_state_file(state_path)
    state_data = _state_bytes(state)
    key_temp = None
    if key is not None:
        key_temp = _write_temp(key_path, _private_key_pem(key), what="private key file")
    try:
        state_temp = _write_temp(state_file, state_data, what="agent state file")
    except IdentityWriteError:
        if key_temp is not None:
            _remove_quietly(key_temp)
        raise
    backup = None
    if key_temp is not None:
        try:
            if os.path.lexists(key_path):
                backup = f"{key_temp}.old"
                os.link(key_path, backup, follow_symlinks=False)
            _rename(key_temp, key_path)
        except OSError as e:
            for leftover in (key_temp, state_temp, backup):
                if leftover is not None:
                    _remove_quietly(leftover)
            raise _write_error(e, key_path, "private key file") from None
    try:
        _rename(state_temp, state_file)
    except OSError as e:
        _remove_quietly(state_temp)
        error = _write_error(e, state_file, "agent state file")
        if key_temp is not None:
            # Roll the key back: the new one is registered nowhere.
            try:
                if backup is not None:
                    os.replace(backup, key_path)
                else:
                    os.unlink(key_path)
            except OSError as undo:
                raise IdentityWriteError(
                    f"{error.problem}; and the previous key could not be put back "
                    f"({_describe_os_error(undo)})",
                    path=key_path,
                    fix=f"move {backup} back to {key_path}" if backup else error.fix,
                ) from None
        raise error from None
    if backup is not None:
        _remove_quietly(backup)
    for directory in {os.path.dirname(os.path.abspath(p)) for p in (key_path, state_file)}:
        _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable.  Some filesystems refuse fsync on a
    # directory; the data is already safe in that case, so carry on.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
