"""
Making an agent's identity: a new RSA key and ``agent.json``, written so that
no reader ever sees a half-written or world-readable file.

Used by ``hostlink-tw init``, the demo and the test and benchmark fixtures;
the agent itself only loads (:mod:`hostlink_tw.agent.identity`).

* :func:`new_private_key` makes a key in memory; :func:`generate_private_key`
  also saves it (PEM PKCS#1, what the Go agent writes).
* :func:`write_agent_state` writes ``agent.json``; :func:`write_identity`
  writes ``agent.json`` and the key as one change (both or neither).

Every file is created with mode 0600 whatever the umask, fsynced, and moved
into place atomically; missing directories are created with mode 0700.  A
failure raises :class:`~hostlink_tw.wire.keys.IdentityError` (kind
``WRITE_FAILED``, or ``PRIVATE_KEY_EXISTS`` / ``PRIVATE_KEY_TOO_SMALL``),
naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import secrets

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from twisted.logger import Logger

from hostlink_tw._files import describe_os_error
from hostlink_tw.agent.identity import AgentState, agent_state_file
from hostlink_tw.wire.keys import MIN_RSA_BITS, IdentityError, IdentityErrorKind

__all__ = [
    "generate_private_key",
    "new_private_key",
    "write_agent_state",
    "write_identity",
]

log = Logger()


def generate_private_key(
    path: str, bits: int = MIN_RSA_BITS, *, overwrite: bool = True
) -> RSAPrivateKey:
    """
    Generate an RSA private key and save it at ``path``.

    The file is unencrypted PEM PKCS#1 (``RSA PRIVATE KEY``, what the Go agent
    writes), created with mode 0600 whatever the umask and moved into place
    atomically, so it is never visible half-written or with wider
    permissions.  The parent directory is created with mode 0700 if missing.

    :param bits: Modulus size; at least :data:`~hostlink_tw.wire.keys.MIN_RSA_BITS`.
    :param overwrite: If false and ``path`` exists, raise
        :class:`~hostlink_tw.wire.keys.IdentityError` (``PRIVATE_KEY_EXISTS``)
        instead of replacing an agent's identity.
    :return: The new key.
    :raises ~hostlink_tw.wire.keys.IdentityError: ``PRIVATE_KEY_TOO_SMALL``:
        ``bits`` below :data:`~hostlink_tw.wire.keys.MIN_RSA_BITS`;
        ``PRIVATE_KEY_EXISTS``: see ``overwrite``; ``WRITE_FAILED``: the
        directory or file cannot be written.
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, not {type(bits).__name__}")
    if bits < MIN_RSA_BITS:
        raise IdentityError(
            IdentityErrorKind.PRIVATE_KEY_TOO_SMALL,
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
    A new RSA private key of ``bits`` bits (in memory only; see
    :func:`write_identity` and :func:`generate_private_key` to save one).

    :raises ~hostlink_tw.wire.keys.IdentityError: ``PRIVATE_KEY_TOO_SMALL``:
        ``bits`` below :data:`~hostlink_tw.wire.keys.MIN_RSA_BITS`.
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, not {type(bits).__name__}")
    if bits < MIN_RSA_BITS:
        raise IdentityError(
            IdentityErrorKind.PRIVATE_KEY_TOO_SMALL,
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


def _key_exists_error(path: str) -> IdentityError:
    return IdentityError(
        IdentityErrorKind.PRIVATE_KEY_EXISTS,
        f"private key file {path} already exists; not replacing this agent's key",
        path=path,
        fix="use the existing key, or move it away first if a new identity is intended",
    )


def write_agent_state(state_path: str, state: AgentState) -> str:
    """
    Write ``state`` to ``agent.json`` in the directory ``state_path``.

    The file is written atomically (a temporary file in the same directory,
    fsynced, then renamed over the old one) and has mode 0600 from the
    moment it exists, whatever the umask.  The directory is created with mode
    0700 if missing.

    :return: The path of the file written.
    :raises ~hostlink_tw.wire.keys.IdentityError: ``WRITE_FAILED``: the
        directory or file cannot be written.
    """
    path = agent_state_file(state_path)
    _write_file_atomically(path, _state_bytes(state), what="agent state file", overwrite=True)
    return path


def _state_bytes(state: AgentState) -> bytes:
    return (json.dumps(state.to_json_object(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _ensure_private_dir(directory: str) -> None:
    """Create ``directory`` and any missing parents with mode 0700."""
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
    Write ``data`` to a new temporary file next to ``path``, mode 0600, fsynced.

    The file is created with ``O_EXCL`` and mode 0600 (then ``fchmod`` to
    exactly 0600, since the umask can only remove bits); the directory is
    created (0700) if missing.

    :return: The temporary file's path; the caller renames or removes it.
    :raises ~hostlink_tw.wire.keys.IdentityError: ``WRITE_FAILED``: any
        :class:`OSError` (the temporary file is removed).
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


def _write_error(error: OSError, path: str, what: str) -> IdentityError:
    directory = os.path.dirname(os.path.abspath(path))
    return IdentityError(
        IdentityErrorKind.WRITE_FAILED,
        f"cannot write {what} {path}: {describe_os_error(error)}",
        path=path,
        fix=f"make sure {directory} is a writable directory for the user running the agent",
    )


def _rename(source: str, destination: str) -> None:
    # One place for the renames that commit a write, so tests can make the
    # second of two fail (root, as tests often run, ignores read-only modes).
    os.replace(source, destination)


def _write_file_atomically(path: str, data: bytes, *, what: str, overwrite: bool) -> None:
    """
    Write ``data`` to ``path`` with mode 0600 atomically.

    A temporary file (:func:`_write_temp`) is renamed over ``path``, or hard-linked
    to it when not ``overwrite``, which fails if ``path`` exists.  Readers see
    the old file or the new one, never a partial or world-readable one.

    :raises FileExistsError: ``overwrite`` is false and ``path`` exists.
    :raises ~hostlink_tw.wire.keys.IdentityError: ``WRITE_FAILED``: any other
        :class:`OSError`.
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
    Write ``agent.json`` and, when ``key`` is given, the private key, as one
    change: afterwards both files are new, or (on an :class:`~hostlink_tw.wire.keys.IdentityError`)
    both are what they were.

    Both are first written to temporary files next to their destinations.
    Then the key is renamed into place, with the old key kept as a hard link,
    and ``agent.json`` after it; if that last rename fails (a directory in
    its place, a read-only directory...), the old key is put back (or the new
    one removed when there was none), so a failed ``init --force`` never
    leaves a key that the control plane does not know.

    :param key: ``None`` writes ``agent.json`` only, for a key that exists.
    :raises ~hostlink_tw.wire.keys.IdentityError: ``WRITE_FAILED``: nothing
        was changed.
    """
    state_file = agent_state_file(state_path)
    state_data = _state_bytes(state)
    key_temp = None
    if key is not None:
        key_temp = _write_temp(key_path, _private_key_pem(key), what="private key file")
    try:
        state_temp = _write_temp(state_file, state_data, what="agent state file")
    except IdentityError:
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
                raise IdentityError(
                    IdentityErrorKind.WRITE_FAILED,
                    f"{error.problem}; and the previous key could not be put back "
                    f"({describe_os_error(undo)})",
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
