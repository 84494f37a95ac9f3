"""
The operator API's bearer token, in a file only its owner can read.

``twistd hostlink-controlplane`` calls :func:`load_or_create_token` at start:
the first start writes a new random token (256 bits, URL-safe base64) to
``operator.token`` beside the agents file (or where
``--operator-token-file`` says), mode 0600; later starts read it back.  The
``hostlink-tw`` command reads the same file with :func:`read_token_file`.

Like the project's other secret files (the agent's key, the stores), a
token file that group or others may read or write is refused, never
"fixed": someone may already have copied it.  The file is read the
project's way (:func:`~hostlink_tw._files.read_regular_file`: no FIFO, a
size bound, checks on the open descriptor), and it is created complete or
not at all (written to a private temporary file, then linked into place, so
a concurrent start or reader never sees half a token and an existing file
is never replaced).
"""

from __future__ import annotations

import errno
import hmac
import os
import re
import secrets
import stat

from hostlink_tw._files import describe_os_error, read_regular_file

__all__ = [
    "TOKEN_FILE_NAME",
    "OperatorTokenError",
    "check_token",
    "load_or_create_token",
    "read_token_file",
    "token_file_beside",
    "tokens_equal",
]

#: The token file's name beside the agents file.
TOKEN_FILE_NAME = "operator.token"  # noqa: S105 - a file name, not a secret
# A token file is one short line; anything much larger is not one.
_MAX_TOKEN_FILE_BYTES = 4096
# RFC 6750's b64token: what may follow "Bearer " in an Authorization header.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*", re.ASCII)
#: The shortest token accepted from a file (a generated one has 43 characters).
MIN_TOKEN_CHARS = 16
#: The longest token accepted.
MAX_TOKEN_CHARS = 1024


class OperatorTokenError(Exception):
    """The token file cannot be used; the message is one line naming the file."""


def token_file_beside(agents_file: str) -> str:
    """The default token file for an agents file: ``operator.token`` in its directory."""
    return os.path.join(os.path.dirname(os.path.abspath(agents_file)), TOKEN_FILE_NAME)


def check_token(token: str, where: str) -> str:
    """
    ``token`` if it can be a bearer token (RFC 6750 characters, 16 to 1024 long).

    :param where: What held it, for the message (``token file /x``).
    :raises OperatorTokenError: It cannot.
    """
    if not _TOKEN.fullmatch(token):
        raise OperatorTokenError(
            f"{where} does not hold a usable token (one line of letters, digits and "
            f"-._~+/ characters)"
        )
    if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
        raise OperatorTokenError(
            f"{where} holds a token of {len(token)} characters; it must have "
            f"{MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS}"
        )
    return token


def _check_private(path: str, st: os.stat_result) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise OperatorTokenError(
            f"operator token file {path} is accessible by group or others (mode "
            f"{mode:04o}); it must be readable by its owner only (chmod 600, or remove it "
            f"and restart the control plane for a new token)"
        )


def read_token_file(path: str) -> str:
    """
    The token in ``path`` (surrounding whitespace ignored).

    :raises OperatorTokenError: Missing, unreadable, not a regular file,
        readable or writable by group or others, or not a token.
    """
    try:
        data = read_regular_file(path, _MAX_TOKEN_FILE_BYTES, _check_private)
    except OperatorTokenError:
        raise
    except OSError as e:
        raise OperatorTokenError(
            f"operator token file {path} cannot be read: {describe_os_error(e)}"
        ) from None
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        text = "\x00"  # not a token: refused below
    return check_token(text, f"operator token file {path}")


def load_or_create_token(path: str) -> tuple[str, bool]:
    """
    The token in ``path``, written there first (mode 0600) if the file does not exist.

    :returns: The token, and whether this call created the file.
    :raises OperatorTokenError: The file exists and cannot be used
        (:func:`read_token_file`), or cannot be created.
    """
    try:
        return read_token_file(path), False
    except OperatorTokenError:
        if os.path.lexists(path):
            raise
    token = secrets.token_urlsafe(32)
    try:
        _create(path, token)
    except FileExistsError:
        # Another start created it meanwhile: that one is the token.
        return read_token_file(path), False
    except OSError as e:
        raise OperatorTokenError(
            f"operator token file {path} cannot be created: {describe_os_error(e)}"
        ) from None
    return token, True


def _create(path: str, token: str) -> None:
    """Write ``token`` to a new file at ``path``, mode 0600; FileExistsError if one exists."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, f"directory {directory} does not exist", path)
    temp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            # The umask can only remove bits; make it exactly 0600.
            os.fchmod(fd, 0o600)
            os.write(fd, token.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        # link() never replaces an existing file (rename() would).
        os.link(temp, path)
    finally:
        try:
            os.unlink(temp)
        except OSError:
            pass


def tokens_equal(given: bytes, expected: bytes) -> bool:
    """Compare a presented token with the expected one in constant time."""
    return hmac.compare_digest(given, expected)
