"""
What the agent runs on: its state file and its RSA private key, loaded and
checked.

PROTOCOL §1 fixes the formats read here:

* ``$HOSTLINK_STATE_PATH/agent.json``: a JSON object with ``agent_id``
  (string), optional ``last_sync_time`` (int) and optional ``metadata``
  (object of strings) — :func:`load_agent_state`, :class:`AgentState`.
* ``$HOSTLINK_PRIVATE_KEY_PATH``: a PEM RSA private key, PKCS#1
  (``RSA PRIVATE KEY``, what the registration step writes) or PKCS#8
  (``PRIVATE KEY``), at least 2048 bits, unencrypted, mode 0600 —
  :func:`load_private_key`; :func:`default_private_key_path` says where it
  is when the setting is unset.

Every failure to load is an :class:`~hostlink_tw.wire.keys.IdentityError`
whose message names the file, says what is wrong with it and how to fix it,
so an operator can act on the log line alone; its ``kind`` tells the cases
apart.  No message ever carries key material.  Files that others could
replace are loaded with one warning line each.

Files are read through an ``O_NONBLOCK`` open followed by ``fstat`` on the
open descriptor (:mod:`hostlink_tw._files`, shared with the CA file reader),
so the checks (regular file, permissions, size) apply to the very file that
is read, and a FIFO left at the path cannot hang the agent.

Making an identity (key generation, atomic writes) is
:mod:`hostlink_tw.provisioning`; public keys are :mod:`hostlink_tw.wire.keys`.
Everything here is POSIX-only: the permission rules are those of OpenSSH.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from twisted.logger import Logger

from hostlink_tw._files import describe_os_error, read_regular_file
from hostlink_tw._json import INT64_MAX, INT64_MIN, json_kind
from hostlink_tw.wire.keys import MIN_RSA_BITS, IdentityError, IdentityErrorKind
from hostlink_tw.wire.vocabulary import check_agent_id

__all__ = [
    "AGENT_STATE_FILENAME",
    "GO_DEFAULT_PRIVATE_KEY_PATH",
    "PRIVATE_KEY_FILENAME",
    "AgentState",
    "agent_state_file",
    "default_private_key_path",
    "identity_show_command",
    "init_command",
    "load_agent_state",
    "load_private_key",
    "same_file_problem",
]

log = Logger()

#: Name of the agent state file inside the state directory.
AGENT_STATE_FILENAME = "agent.json"

#: Name of the private key inside the state directory when
#: ``HOSTLINK_PRIVATE_KEY_PATH`` is unset (what ``hostlink-tw init`` writes).
PRIVATE_KEY_FILENAME = "agent.key"

#: Where the Go agent keeps its key by default; still used when
#: ``HOSTLINK_PRIVATE_KEY_PATH`` is unset and only this file exists (see
#: :func:`default_private_key_path`).
GO_DEFAULT_PRIVATE_KEY_PATH = "/var/lib/hostlink/agent.key"


# Both files are a few kilobytes at most (a 16384-bit PEM key is ~12 KiB);
# the cap keeps a wrong path (a log file, /dev/zero behind a symlink) from
# being read into memory whole.
_MAX_FILE_BYTES = 1 << 20

_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_PEM_BLOCK = re.compile(
    rb"-----BEGIN (?P<label>[A-Z0-9 ]+)-----.*?-----END (?P=label)-----", re.DOTALL
)


@dataclass(frozen=True)
class AgentState:
    """
    The contents of ``agent.json``.

    Constructing one validates it with the rules :func:`load_agent_state` applies,
    so whatever :func:`hostlink_tw.provisioning.write_agent_state` writes loads
    again.  ``metadata`` is
    stored as a read-only mapping.

    :ivar agent_id: The id the control plane gave this agent at registration.
    :ivar last_sync_time: Unix seconds of the last sync, or ``None``.
    :ivar metadata: Free-form string labels.
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
        The JSON object written to ``agent.json``; absent optional fields are
        omitted.
        """
        obj: dict[str, Any] = {"agent_id": self.agent_id}
        if self.last_sync_time is not None:
            obj["last_sync_time"] = self.last_sync_time
        if self.metadata:
            obj["metadata"] = dict(self.metadata)
        return obj


def agent_state_file(state_path: str) -> str:
    """The path of ``agent.json`` inside the state directory ``state_path``."""
    return os.path.join(state_path, AGENT_STATE_FILENAME)


def default_private_key_path(state_path: str, logger: Logger | None = None) -> str:
    """
    The private key path when ``HOSTLINK_PRIVATE_KEY_PATH`` is unset.

    ``$HOSTLINK_STATE_PATH/agent.key``, where ``hostlink-tw init`` writes it,
    so the two agree for any state directory.  For agents migrating from the
    Go agent's layout (a key at :data:`GO_DEFAULT_PRIVATE_KEY_PATH` next to a
    state directory elsewhere): when ``state_path/agent.key`` does not exist
    but the Go default does, the Go default is used, and that choice is
    logged.  When neither exists, ``state_path/agent.key`` (what the error
    message will name, and what ``init`` creates).

    :param logger: Where the choice of the Go default is logged (info).
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


def init_command(state_path: str, private_key_path: str | None = None, *, force: bool) -> str:
    """
    The ``hostlink-tw init`` command line that acts on exactly this identity.

    It names ``--state-path`` always, ``--private-key-path`` only when the key
    is not at its default place for that state directory (``agent.key`` in
    it), and ``--force`` only when asked: where init would otherwise refuse
    (an existing, unusable file).  Paths are shell-quoted, so the line can be
    copied as it is.
    """
    words = ["hostlink-tw", "init"]
    if force:
        words.append("--force")
    words += ["--state-path", state_path]
    if private_key_path is not None and not _is_default_key_place(state_path, private_key_path):
        words += ["--private-key-path", private_key_path]
    return shlex.join(words)


def identity_show_command(state_path: str, private_key_path: str | None = None) -> str:
    """The ``hostlink-tw identity show`` command line (as :func:`init_command`)."""
    words = ["hostlink-tw", "identity", "show", "--state-path", state_path]
    if private_key_path is not None and not _is_default_key_place(state_path, private_key_path):
        words += ["--private-key-path", private_key_path]
    return shlex.join(words)


def _is_default_key_place(state_path: str, private_key_path: str) -> bool:
    preferred = os.path.join(state_path, PRIVATE_KEY_FILENAME)
    return os.path.abspath(preferred) == os.path.abspath(private_key_path)


def same_file_problem(state_path: str, private_key_path: str) -> str | None:
    """
    Why the private key cannot live at ``private_key_path``: it is the agent
    state file itself (same real path, or the same inode when both exist),
    so writing one would destroy the other.  ``None`` when they differ.
    """
    state_file = agent_state_file(state_path)
    same = os.path.realpath(state_file) == os.path.realpath(private_key_path)
    if not same:
        try:
            same = os.path.samefile(state_file, private_key_path)
        except OSError:
            same = False  # One of them does not exist (yet): the paths differ.
    if not same:
        return None
    return (
        f"the private key path {private_key_path} is the agent state file {state_file}; "
        "they must be two different files (leave --private-key-path unset to use "
        f"{os.path.join(state_path, PRIVATE_KEY_FILENAME)})"
    )


def load_agent_state(state_path: str, *, private_key_path: str | None = None) -> AgentState:
    """
    Load ``agent.json`` from the state directory ``state_path``.

    Go-compatible typing (PROTOCOL §1): ``last_sync_time`` must be a JSON
    integer within int64 (a float such as ``1.0``, a string or a boolean is
    refused, as Go's decoder refuses them); ``metadata`` must be an object of
    strings.  ``null`` for either means absent.  Unknown keys are ignored, as
    Go ignores them.  Key names are matched exactly.

    :param state_path: The state *directory* (``HOSTLINK_STATE_PATH``).
    :param private_key_path: The key path in use, named in the ``init``
        command of an error's fix when it is not ``agent.key`` in ``state_path``.
    :raises ~hostlink_tw.wire.keys.IdentityError: of the kind
        (:class:`~hostlink_tw.wire.keys.IdentityErrorKind`)
        ``AGENT_STATE_MISSING``: no such file, the agent is not registered;
        ``AGENT_STATE_UNREADABLE``: permission denied, a directory, too big...;
        ``AGENT_STATE_NOT_JSON``: not UTF-8, not JSON, or ``NaN``/``Infinity``;
        ``AGENT_STATE_NOT_OBJECT``: valid JSON but not an object;
        ``AGENT_ID``: ``agent_id`` missing, empty or not a usable string;
        ``AGENT_STATE_FIELD``: a wrongly typed optional field.
    """
    path = agent_state_file(state_path)
    register_fix = (
        f"create this agent's identity with "
        f"'{init_command(state_path, private_key_path, force=False)}' "
        "(it writes agent.json and the key), or set HOSTLINK_STATE_PATH to the directory "
        "that holds agent.json"
    )
    # The file exists but is unusable: init refuses to replace it without --force.
    replace_fix = (
        f"restore {path} from a backup, or create a new identity with "
        f"'{init_command(state_path, private_key_path, force=True)}'"
    )
    try:
        data = _read_small_file(path, check_mode=_warn_if_writable_by_others)
    except FileNotFoundError:
        raise IdentityError(
            IdentityErrorKind.AGENT_STATE_MISSING,
            f"agent state file {path} does not exist (this agent has no identity yet)",
            path=path,
            fix=register_fix,
        ) from None
    except NotADirectoryError:
        raise IdentityError(
            IdentityErrorKind.AGENT_STATE_UNREADABLE,
            f"cannot read agent state file {path}: {state_path} is not a directory",
            path=path,
            fix="set HOSTLINK_STATE_PATH to the directory that holds agent.json, "
            "not to the file itself",
        ) from None
    except OSError as e:
        raise IdentityError(
            IdentityErrorKind.AGENT_STATE_UNREADABLE,
            f"cannot read agent state file {path}: {describe_os_error(e)}",
            path=path,
            fix=_unreadable_fix(e, path, "a regular file holding the agent state"),
        ) from None

    fix_json = replace_fix
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise IdentityError(
            IdentityErrorKind.AGENT_STATE_NOT_JSON,
            f"agent state file {path} is not UTF-8 text", path=path, fix=fix_json
        ) from None
    if not text.strip():
        raise IdentityError(
            IdentityErrorKind.AGENT_STATE_NOT_JSON,
            f"agent state file {path} is empty",
            path=path,
            fix=fix_json,
        )
    try:
        obj = json.loads(text, parse_constant=_refuse_json_constant)
    except (ValueError, RecursionError) as e:
        # JSONDecodeError is a ValueError; its text gives line and column.
        raise IdentityError(
            IdentityErrorKind.AGENT_STATE_NOT_JSON,
            f"agent state file {path} is not valid JSON ({_json_error_text(e)})",
            path=path,
            fix=fix_json,
        ) from None
    if not isinstance(obj, dict):
        raise IdentityError(
            IdentityErrorKind.AGENT_STATE_NOT_OBJECT,
            f"agent state file {path} holds {json_kind(obj)}, "
            f"not a JSON object with an agent_id",
            path=path,
            fix=fix_json,
        )

    if "agent_id" not in obj:
        raise IdentityError(
            IdentityErrorKind.AGENT_ID,
            f"agent state file {path} has no agent_id (this agent has no identity yet)",
            path=path,
            fix=replace_fix,
        )
    try:
        agent_id = check_agent_id(obj["agent_id"])
    except ValueError as e:
        # The message ends with the rule (protocol.AGENT_ID_RULE).
        raise IdentityError(
            IdentityErrorKind.AGENT_ID,
            f"agent state file {path}: {e}",
            path=path,
            fix=(
                f"set agent_id in {path} to the id the control plane knows this agent by "
                "(within the rule)"
                if isinstance(obj["agent_id"], str) and obj["agent_id"]
                else replace_fix
            ),
        ) from None

    last_sync_time = obj.get("last_sync_time")
    problem = _last_sync_time_problem(last_sync_time)
    if problem is not None:
        raise IdentityError(
            IdentityErrorKind.AGENT_STATE_FIELD,
            f"agent state file {path}: {problem}",
            path=path,
            fix="correct or remove last_sync_time (an integer of Unix seconds)",
        )
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    problem = _metadata_problem(metadata)
    if problem is not None:
        raise IdentityError(
            IdentityErrorKind.AGENT_STATE_FIELD,
            f"agent state file {path}: {problem}",
            path=path,
            fix="correct or remove metadata (an object whose values are strings)",
        )
    _warn_if_directory_writable_by_others(state_path)
    return AgentState(agent_id=agent_id, last_sync_time=last_sync_time, metadata=metadata)


def _warn_if_writable_by_others(
    path: str, st: os.stat_result, what: str = "agent state file"
) -> None:
    # Not refused (the Go agent reads such files too), but whoever can write
    # agent.json can make this agent claim another agent's id, and whoever
    # can write the directory can rename another file over it (or the key).
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        log.warn(
            "{what} {path} is writable by group or others (mode {mode}); "
            "fix: chmod go-w {quoted}",
            what=what,
            path=path,
            mode=f"{mode:04o}",
            quoted=shlex.quote(path),
        )


def _warn_if_directory_writable_by_others(directory: str) -> None:
    try:
        st = os.stat(directory)
    except OSError:
        return
    _warn_if_writable_by_others(directory, st, "state directory")


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


def load_private_key(path: str, *, state_path: str | None = None) -> RSAPrivateKey:
    """
    Load the agent's RSA private key from the PEM file ``path``.

    Accepted: an unencrypted PEM ``RSA PRIVATE KEY`` (PKCS#1) or
    ``PRIVATE KEY`` (PKCS#8) block holding an RSA key of at least
    :data:`MIN_RSA_BITS` bits.  As with Go's ``pem.Decode``, the first PEM block in
    the file is the one used.

    Like OpenSSH, a key file that group or others may read or write is
    refused before it is even read: the fix is ``chmod 600``.

    :raises ~hostlink_tw.wire.keys.IdentityError: of the kind
        ``PRIVATE_KEY_MISSING``: no such file;
        ``PRIVATE_KEY_UNREADABLE``: permission denied, a directory, too big...;
        ``PRIVATE_KEY_PERMISSIONS``: mode allows group or other access;
        ``PRIVATE_KEY_EMPTY``: the file is empty;
        ``PRIVATE_KEY_FORMAT``: not a PEM private key (garbage, a public key,
        an OpenSSH-format key, a corrupt block);
        ``PRIVATE_KEY_ENCRYPTED``: the key is protected by a password;
        ``PRIVATE_KEY_NOT_RSA``: EC, Ed25519, DSA or another non-RSA key;
        ``PRIVATE_KEY_TOO_SMALL``: RSA with fewer than 2048 bits.

    :param state_path: The state directory in use, named in the ``init``
        command of an error's fix.  Without it, a key named ``agent.key``
        implies its own directory (where ``init`` puts it); any other name
        gets a ``STATE_DIR`` placeholder, explained.
    """
    where = ""
    if state_path is not None:
        state_dir = state_path
    elif os.path.basename(path) == PRIVATE_KEY_FILENAME:
        state_dir = os.path.dirname(path) or "."  # where init puts agent.key
    else:
        # Unknown, and no guess is safe: init must write agent.json where the agent reads it.
        state_dir, where = "STATE_DIR", " (STATE_DIR: the directory that holds agent.json)"
    # A missing key: plain init writes it (keeping an existing agent.json).
    # A key that exists but is unusable: init refuses it without --force.
    missing_fix = (
        f"point HOSTLINK_PRIVATE_KEY_PATH at this agent's PEM RSA private key, or create "
        f"it with '{init_command(state_dir, path, force=False)}'{where}"
    )
    regenerate = (
        f"point HOSTLINK_PRIVATE_KEY_PATH at this agent's PEM RSA private key "
        f"(2048 bits or more), or create a new identity with "
        f"'{init_command(state_dir, path, force=True)}'{where} to replace {path}"
    )
    try:
        data = _read_small_file(path, check_mode=_check_key_mode)
    except FileNotFoundError:
        raise IdentityError(
            IdentityErrorKind.PRIVATE_KEY_MISSING,
            f"private key file {path} does not exist", path=path, fix=missing_fix
        ) from None
    except OSError as e:
        raise IdentityError(
            IdentityErrorKind.PRIVATE_KEY_UNREADABLE,
            f"cannot read private key file {path}: {describe_os_error(e)}",
            path=path,
            fix=_unreadable_fix(e, path, "the agent's PEM private key file"),
        ) from None

    if not data.strip():
        raise IdentityError(
            IdentityErrorKind.PRIVATE_KEY_EMPTY,
            f"private key file {path} is empty",
            path=path,
            fix=regenerate,
        )
    block = _PEM_BLOCK.search(data)
    if block is None:
        begin = _PEM_BEGIN.search(data)
        problem = (
            f"private key file {path} has a BEGIN {begin.group(1).decode()} line "
            f"but no matching END line"
            if begin is not None
            else f"private key file {path} is not a PEM file"
        )
        raise IdentityError(
            IdentityErrorKind.PRIVATE_KEY_FORMAT,
            problem,
            path=path,
            fix=regenerate,
        )

    label = block.group("label").decode("ascii")
    pem = block.group(0)
    _check_pem_label(path, label, pem, regenerate)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        # cryptography's way of saying "encrypted, and no password given".
        raise _encrypted_key_error(path) from None
    except UnsupportedAlgorithm:
        raise IdentityError(
            IdentityErrorKind.PRIVATE_KEY_NOT_RSA,
            f"private key file {path} holds a key of an unsupported algorithm, not RSA",
            path=path,
            fix=regenerate,
        ) from None
    except ValueError:
        # The library's message is generic; the PEM label says more.
        raise IdentityError(
            IdentityErrorKind.PRIVATE_KEY_FORMAT,
            f"private key file {path} holds a {label} block that cannot be decoded "
            f"(corrupt, truncated or not an RSA key)",
            path=path,
            fix=regenerate,
        ) from None
    if not isinstance(key, RSAPrivateKey):
        raise IdentityError(
            IdentityErrorKind.PRIVATE_KEY_NOT_RSA,
            f"private key file {path} holds {_key_kind(key)}, not an RSA key",
            path=path,
            fix=regenerate,
        )
    if key.key_size < MIN_RSA_BITS:
        raise IdentityError(
            IdentityErrorKind.PRIVATE_KEY_TOO_SMALL,
            f"private key file {path} holds a {key.key_size}-bit RSA key; "
            f"at least {MIN_RSA_BITS} bits are required",
            path=path,
            fix=regenerate,
        )
    return key


def _check_key_mode(path: str, st: os.stat_result) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise IdentityError(
            IdentityErrorKind.PRIVATE_KEY_PERMISSIONS,
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
        raise IdentityError(
            IdentityErrorKind.PRIVATE_KEY_NOT_RSA,
            f"private key file {path} holds an {label.split()[0]} key, not an RSA key",
            path=path,
            fix=regenerate,
        )
    if label == "OPENSSH PRIVATE KEY":
        raise IdentityError(
            IdentityErrorKind.PRIVATE_KEY_FORMAT,
            f"private key file {path} is in OpenSSH format, not PEM",
            path=path,
            fix=f"convert it with: ssh-keygen -p -N '' -m PEM -f {shlex.quote(path)}",
        )
    raise IdentityError(
        IdentityErrorKind.PRIVATE_KEY_FORMAT,
        f"private key file {path} holds a {label}, not an RSA private key",
        path=path,
        fix=regenerate,
    )


def _encrypted_key_error(path: str) -> IdentityError:
    return IdentityError(
        IdentityErrorKind.PRIVATE_KEY_ENCRYPTED,
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


# --------------------------------------------------------------------------
# File helpers


def _read_small_file(
    path: str, check_mode: Callable[[str, os.stat_result], None] | None = None
) -> bytes:
    """
    Read a small regular file with the shared discipline of
    :func:`hostlink_tw._files.read_regular_file` (non-blocking open, checks on
    the open descriptor), bounded by ``_MAX_FILE_BYTES``.

    :raises OSError: ``FileNotFoundError``, ``PermissionError``,
        ``IsADirectoryError``, not a regular file, too large...
    :raises ~hostlink_tw.wire.keys.IdentityError: Whatever ``check_mode`` raises.
    """
    return read_regular_file(path, _MAX_FILE_BYTES, check_mode)

def _unreadable_fix(error: OSError, path: str, expected: str) -> str:
    if isinstance(error, PermissionError):
        return (
            f"run the agent as the user that owns {path}, or give that user read "
            f"access to it (and search access to its directories)"
        )
    return f"make {path} {expected}"


