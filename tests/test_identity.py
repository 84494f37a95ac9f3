"""Tests for the identity modules: loading agent.json and the private key
(hostlink_tw.agent.identity), provisioning, public key export (hostlink_tw.wire.keys)."""

from __future__ import annotations

import base64
import errno
import functools
import json
import os
import shlex
import stat
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hostlink_tw import _files, provisioning
from hostlink_tw.agent import identity
from hostlink_tw.agent.identity import (
    AGENT_STATE_FILENAME,
    AgentState,
    agent_state_file,
    default_private_key_path,
    load_agent_state,
    load_private_key,
)
from hostlink_tw.protocol import AGENT_ID_RULE
from hostlink_tw.provisioning import generate_private_key, write_agent_state, write_identity
from hostlink_tw.wire.keys import (
    IdentityError,
    IdentityErrorKind,
    load_public_key,
    public_key_base64,
    public_key_pem,
)
from hostlink_tw.wire.vocabulary import check_agent_id

# Key generation is slow: every key a test needs is made once per run.


@functools.cache
def rsa_key(bits: int = 2048, which: int = 0) -> RSAPrivateKey:
    """An RSA key of C{bits}; C{which} tells apart keys of the same size."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@functools.cache
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@functools.cache
def ed25519_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@functools.cache
def dsa_key() -> dsa.DSAPrivateKey:
    return dsa.generate_private_key(key_size=2048)


def pem(
    key: Any,
    fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
    password: bytes | None = None,
) -> bytes:
    """Serialise a private key as PEM, optionally encrypted."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password is not None
        else serialization.NoEncryption()
    )
    data: bytes = key.private_bytes(serialization.Encoding.PEM, fmt, encryption)
    return data


PKCS1 = serialization.PrivateFormat.TraditionalOpenSSL
PKCS8 = serialization.PrivateFormat.PKCS8


def body_lines(pem_data: bytes) -> list[str]:
    """The base64 lines of a PEM block: key material that must never leak."""
    return [
        line.decode()
        for line in pem_data.splitlines()
        if line and not line.startswith(b"-----") and b":" not in line
    ]


class _TempDirMixin:
    """Fresh directories and files under trial's temp dir."""

    mktemp: Callable[[], str]
    addCleanup: Callable[..., None]

    def make_dir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.mkdir(path)
        return path

    def write_file(self, path: str, data: bytes, mode: int = 0o600) -> str:
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        return path

    def key_file(self, data: bytes, mode: int = 0o600) -> str:
        return self.write_file(os.path.join(self.make_dir(), "agent.key"), data, mode)

    def state_dir(self, content: bytes | str | None) -> str:
        """A state directory whose agent.json holds C{content} (None: no file)."""
        directory = self.make_dir()
        if content is not None:
            if isinstance(content, str):
                content = content.encode("utf-8")
            self.write_file(os.path.join(directory, AGENT_STATE_FILENAME), content)
        return directory

    def zero_umask(self) -> None:
        """Run the rest of the test with umask 0, the worst case for new files."""
        self.set_umask(0)

    def set_umask(self, mask: int) -> None:
        """Run the rest of the test with umask C{mask}."""
        old = os.umask(mask)
        self.addCleanup(os.umask, old)


def simulate_eacces(path: str) -> int:
    """Replacement for _files._open_readonly: root never sees EACCES for real."""
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)


def file_mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_raises_kind(
    case: SynchronousTestCase,
    kind: IdentityErrorKind,
    f: Callable[..., object],
    *args: Any,
    **kwargs: Any,
) -> IdentityError:
    """C{f(*args, **kwargs)} raises the one identity error type, of exactly C{kind}."""
    error = case.assertRaises(IdentityError, f, *args, **kwargs)
    case.assertIs(error.kind, kind, str(error))
    return error


# --------------------------------------------------------------------------


class AgentStateLoadTests(_TempDirMixin, SynchronousTestCase):
    """load_agent_state: what loads, and a distinct, helpful error for the rest."""

    def assertStateError(
        self, content: bytes | str | None, kind: IdentityErrorKind, *needles: str
    ) -> IdentityError:
        """Loading C{content} raises exactly C{kind}, naming the path and a fix."""
        directory = self.state_dir(content)
        path = os.path.join(directory, AGENT_STATE_FILENAME)
        error = self.assertRaises(IdentityError, load_agent_state, directory)
        self.assertIs(error.kind, kind, f"{content!r}: {error}")
        self.assertEqual(error.kind.subject, "agent_state")
        self.assertIn(path, str(error))
        self.assertEqual(error.path, path)
        self.assertIn("Fix: ", str(error))
        self.assertTrue(error.fix)
        for needle in needles:
            self.assertIn(needle, str(error))
        return error

    def test_minimal(self) -> None:
        """An object with just agent_id loads, with no sync time and no metadata."""
        state = load_agent_state(self.state_dir('{"agent_id": "agt_123"}'))
        self.assertEqual(state, AgentState(agent_id="agt_123"))
        self.assertIsNone(state.last_sync_time)
        self.assertEqual(dict(state.metadata), {})

    def test_full(self) -> None:
        """All fields load; unknown keys are ignored (as Go's decoder ignores them)."""
        content = {
            "agent_id": "agt_123",
            "last_sync_time": 1714215780,
            "metadata": {"hostname": "web-1", "région": "eu"},
            "future_field": [1, 2, 3],
        }
        state = load_agent_state(self.state_dir(json.dumps(content)))
        self.assertEqual(state.agent_id, "agt_123")
        self.assertEqual(state.last_sync_time, 1714215780)
        self.assertEqual(dict(state.metadata), {"hostname": "web-1", "région": "eu"})

    def test_null_optional_fields(self) -> None:
        """null for an optional field means absent."""
        state = load_agent_state(
            self.state_dir('{"agent_id": "a", "last_sync_time": null, "metadata": null}')
        )
        self.assertEqual(state, AgentState(agent_id="a"))

    def test_int64_bounds(self) -> None:
        """Any int64 is a valid last_sync_time, negative ones included."""
        for value in (0, -1, 2**63 - 1, -(2**63)):
            state = load_agent_state(
                self.state_dir(json.dumps({"agent_id": "a", "last_sync_time": value}))
            )
            self.assertEqual(state.last_sync_time, value)

    def test_state_path_is_the_directory(self) -> None:
        """agent_state_file joins agent.json onto the directory."""
        self.assertEqual(agent_state_file("/var/lib/hostlink"), "/var/lib/hostlink/agent.json")

    def test_missing_file(self) -> None:
        """No agent.json: no identity yet, and the fix names the command that makes one."""
        error = self.assertStateError(
            None, IdentityErrorKind.AGENT_STATE_MISSING, "does not exist", "no identity yet"
        )
        self.assertIn(f"'hostlink-tw init --state-path {os.path.dirname(error.path)}'", str(error))
        self.assertNotIn("regist", str(error))

    def test_missing_directory(self) -> None:
        """A state directory that does not exist is the same missing file."""
        directory = self.mktemp()
        error = assert_raises_kind(
            self, IdentityErrorKind.AGENT_STATE_MISSING, load_agent_state, directory
        )
        self.assertIn(os.path.join(directory, AGENT_STATE_FILENAME), str(error))
        self.assertIn("HOSTLINK_STATE_PATH", str(error))

    def test_state_path_names_the_file(self) -> None:
        """HOSTLINK_STATE_PATH pointing at agent.json itself gets a specific fix."""
        directory = self.state_dir('{"agent_id": "a"}')
        wrong = os.path.join(directory, AGENT_STATE_FILENAME)
        error = assert_raises_kind(
            self, IdentityErrorKind.AGENT_STATE_UNREADABLE, load_agent_state, wrong
        )
        self.assertIn("is not a directory", str(error))
        self.assertIn("HOSTLINK_STATE_PATH to the directory", str(error))

    def test_is_a_directory(self) -> None:
        """agent.json being a directory is unreadable, and said so."""
        directory = self.make_dir()
        os.mkdir(os.path.join(directory, AGENT_STATE_FILENAME))
        error = assert_raises_kind(
            self, IdentityErrorKind.AGENT_STATE_UNREADABLE, load_agent_state, directory
        )
        self.assertIn("is a directory", str(error))
        self.assertIn(os.path.join(directory, AGENT_STATE_FILENAME), str(error))

    def test_permission_denied(self) -> None:
        """EACCES is unreadable, and the fix is about the running user."""
        self.patch(_files, "_open_readonly", simulate_eacces)
        error = self.assertStateError('{"agent_id": "a"}', IdentityErrorKind.AGENT_STATE_UNREADABLE)
        self.assertIn("permission denied", str(error))
        self.assertIn("run the agent as the user", str(error))

    def test_permission_denied_real(self) -> None:
        """Same with a real mode-000 file, where the test is not root."""
        if os.geteuid() == 0:
            raise SkipTest("root reads mode-000 files; test_permission_denied covers it")
        directory = self.state_dir('{"agent_id": "a"}')
        os.chmod(os.path.join(directory, AGENT_STATE_FILENAME), 0)
        error = assert_raises_kind(
            self, IdentityErrorKind.AGENT_STATE_UNREADABLE, load_agent_state, directory
        )
        self.assertIn("permission denied", str(error))

    def test_fifo_is_not_read(self) -> None:
        """A FIFO at the path is refused at once instead of blocking the agent."""
        directory = self.make_dir()
        os.mkfifo(os.path.join(directory, AGENT_STATE_FILENAME))
        error = assert_raises_kind(
            self, IdentityErrorKind.AGENT_STATE_UNREADABLE, load_agent_state, directory
        )
        self.assertIn("not a regular file", str(error))

    def test_too_large(self) -> None:
        """A file far larger than any agent state is refused unread."""
        content = b'{"agent_id": "a", "pad": "' + b"x" * (2 << 20) + b'"}'
        error = self.assertStateError(content, IdentityErrorKind.AGENT_STATE_UNREADABLE)
        self.assertIn("larger than", str(error))

    def test_invalid_json(self) -> None:
        """Everything that is not strict UTF-8 JSON is AGENT_STATE_NOT_JSON."""
        cases: list[tuple[bytes | str, str]] = [
            ("", "is empty"),
            ("  \n", "is empty"),
            ("agent_id=a", "not valid JSON"),
            ('{"agent_id": "a"', "not valid JSON"),
            ('{"agent_id": "a",}', "not valid JSON"),
            ("{'agent_id': 'a'}", "not valid JSON"),
            ('{"agent_id": "a"} trailing', "not valid JSON"),
            ('{"agent_id": "a", "last_sync_time": NaN}', "NaN"),
            ('{"agent_id": "a", "last_sync_time": Infinity}', "Infinity"),
            ('{"agent_id": "a", "last_sync_time": -Infinity}', "Infinity"),
            (b'{"agent_id": "\xff\xfe"}', "not UTF-8"),
            ("[" * 200_000, "nested too deeply"),
        ]
        for content, needle in cases:
            self.assertStateError(
                content, IdentityErrorKind.AGENT_STATE_NOT_JSON, needle, "restore"
            )

    def test_not_an_object(self) -> None:
        """Valid JSON that is not an object says what it is instead."""
        cases = [
            ("[]", "an array"),
            ('["agent_id", "a"]', "an array"),
            ('"agt_1"', "a string"),
            ("42", "an integer"),
            ("null", "null"),
            ("true", "a boolean"),
        ]
        for content, needle in cases:
            self.assertStateError(
                content, IdentityErrorKind.AGENT_STATE_NOT_OBJECT, needle, "not a JSON object"
            )

    def test_agent_id_missing(self) -> None:
        """
        No agent_id: no identity yet; the fix names hostlink-tw init with
        --force (plain init refuses an existing agent.json) and this directory.
        """
        error = self.assertStateError(
            '{"last_sync_time": 1}',
            IdentityErrorKind.AGENT_ID,
            "no agent_id",
            "hostlink-tw init --force --state-path",
        )
        self.assertIn(f"--state-path {shlex.quote(os.path.dirname(error.path or ''))}'", str(error))
        self.assertStateError("{}", IdentityErrorKind.AGENT_ID, "no identity yet")

    def test_agent_id_unusable(self) -> None:
        """Empty, non-string or header-breaking agent ids are refused."""
        cases = [
            ('""', "agent_id is empty"),
            ("null", "agent_id is null"),
            ("42", "agent_id is an integer"),
            ("true", "agent_id is a boolean"),
            ('["a"]', "agent_id is an array"),
            ('{"id": "a"}', "agent_id is an object"),
            ('"agt\\r\\nX-Evil: 1"', "control character outside the alphabet (U+000D)"),
            ('"agt\\u0000"', "control character outside the alphabet (U+0000)"),
            ('" agt"', "(U+0020)"),
            ('"agt\\t"', "control character outside the alphabet (U+0009)"),
            # Issue 10.9: non-ASCII ids can never authenticate (headers are
            # decoded as ISO-8859-1 on the other side); over 256 characters
            # the control plane refuses them.
            ('"ag\u00ebnt"', "outside the alphabet (U+00EB)"),
            ('"' + "a" * 257 + '"', "has 257 characters"),
            # Issue 10.15: a lone surrogate silenced every log event.
            ('"agt\\ud800"', "outside the alphabet (U+D800)"),
        ]
        for value, needle in cases:
            self.assertStateError(
                '{"agent_id": ' + value + "}", IdentityErrorKind.AGENT_ID, needle, AGENT_ID_RULE
            )

    def test_agent_id_at_the_limits(self) -> None:
        """Every character of the alphabet, and exactly 256 characters, load."""
        for agent_id in ("a", "A-Z.a_z:0@9", "x" * 256, "550e8400-e29b-41d4-a716-446655440000"):
            directory = self.make_dir()
            write_agent_state(directory, AgentState(agent_id))
            self.assertEqual(load_agent_state(directory).agent_id, agent_id)

    def test_last_sync_time_wrong_type(self) -> None:
        """Go refuses non-integers for an int64 field; so do we, clearly."""
        cases = [
            ("1.0", "1.0, not an integer (no fraction or exponent)"),
            ("1.5", "1.5, not an integer (no fraction or exponent)"),
            ("1e9", "not an integer (no fraction or exponent)"),
            ('"1714215780"', "a string"),
            ("true", "a boolean"),
            ("[1]", "an array"),
            (str(2**63), "64-bit"),
            (str(-(2**63) - 1), "64-bit"),
        ]
        for value, needle in cases:
            self.assertStateError(
                '{"agent_id": "a", "last_sync_time": ' + value + "}",
                IdentityErrorKind.AGENT_STATE_FIELD,
                "last_sync_time",
                needle,
            )

    def test_metadata_wrong_type(self) -> None:
        """metadata must be an object of strings."""
        cases = [
            ('["a"]', "not an object"),
            ('"a=b"', "not an object"),
            ("1", "not an object"),
            ('{"a": 1}', "metadata['a'] is an integer"),
            ('{"a": null}', "metadata['a'] is null"),
            ('{"a": {"b": "c"}}', "metadata['a'] is an object"),
        ]
        for value, needle in cases:
            self.assertStateError(
                '{"agent_id": "a", "metadata": ' + value + "}",
                IdentityErrorKind.AGENT_STATE_FIELD,
                needle,
            )

    def test_error_kinds(self) -> None:
        """Every agent state problem is about the agent state, not the key."""
        for kind in (
            IdentityErrorKind.AGENT_STATE_MISSING,
            IdentityErrorKind.AGENT_STATE_UNREADABLE,
            IdentityErrorKind.AGENT_STATE_NOT_JSON,
            IdentityErrorKind.AGENT_STATE_NOT_OBJECT,
            IdentityErrorKind.AGENT_STATE_FIELD,
            IdentityErrorKind.AGENT_ID,
        ):
            self.assertEqual(kind.subject, "agent_state", kind)
            self.assertNotEqual(kind.subject, "private_key", kind)


class AgentStateValueTests(SynchronousTestCase):
    """AgentState itself and check_agent_id."""

    def test_validates(self) -> None:
        """An AgentState that could not be loaded back cannot be built."""
        self.assertRaises(ValueError, AgentState, "")
        self.assertRaises(ValueError, AgentState, "a\nb")
        self.assertRaises(ValueError, AgentState, "a", last_sync_time=True)
        self.assertRaises(ValueError, AgentState, "a", last_sync_time=1.0)
        self.assertRaises(ValueError, AgentState, "a", metadata={"k": 1})

    def test_metadata_is_frozen(self) -> None:
        """Changing the dict passed in, or the attribute, cannot change the state."""
        source = {"k": "v"}
        state = AgentState("a", metadata=source)
        source["k"] = "changed"
        self.assertEqual(dict(state.metadata), {"k": "v"})
        metadata: Any = state.metadata

        def mutate() -> None:
            metadata["k"] = "x"

        self.assertRaises(TypeError, mutate)

    def test_check_agent_id(self) -> None:
        """check_agent_id returns good ids and raises ValueError otherwise."""
        self.assertEqual(check_agent_id("agt_01HX"), "agt_01HX")
        for bad in ("", None, 1, " a", "a ", "a\r", "a\x7f", "agent ünïcode", "\ud800", "a" * 257):
            error = self.assertRaises(ValueError, check_agent_id, bad)
            self.assertIn(AGENT_ID_RULE, str(error))
        self.assertRaises(ValueError, AgentState, "agënt")


class AgentStateWriteTests(_TempDirMixin, SynchronousTestCase):
    """write_agent_state: round trip, 0600, atomic."""

    def test_round_trip(self) -> None:
        """What is written loads back equal, and the path is returned."""
        directory = self.make_dir()
        state = AgentState("agt_1", last_sync_time=1714215780, metadata={"h": "web-1"})
        path = write_agent_state(directory, state)
        self.assertEqual(path, os.path.join(directory, AGENT_STATE_FILENAME))
        self.assertEqual(load_agent_state(directory), state)

    def test_json_form(self) -> None:
        """The file is a JSON object; absent optional fields are omitted."""
        directory = self.make_dir()
        path = write_agent_state(directory, AgentState("agt_1"))
        with open(path, encoding="utf-8") as f:
            self.assertEqual(json.load(f), {"agent_id": "agt_1"})
        write_agent_state(directory, AgentState("agt_1", 7, {"a": "b"}))
        with open(path, encoding="utf-8") as f:
            self.assertEqual(
                json.load(f), {"agent_id": "agt_1", "last_sync_time": 7, "metadata": {"a": "b"}}
            )

    def test_mode_0600_with_umask_0(self) -> None:
        """The file is 0600 even when the umask would allow everything."""
        self.zero_umask()
        directory = self.make_dir()
        path = write_agent_state(directory, AgentState("a"))
        self.assertEqual(file_mode(path), 0o600)

    def test_mode_exactly_0600_with_strict_umask(self) -> None:
        """
        A umask that removes owner bits does not leave a 0400 file or a 0500
        directory: modes are set exactly, not left to the umask.
        """
        self.set_umask(0o277)
        directory = os.path.join(os.path.abspath(self.mktemp()), "state")
        path = write_agent_state(directory, AgentState("a"))
        self.assertEqual(file_mode(path), 0o600)
        self.assertEqual(file_mode(directory), 0o700)

    def test_replaces_wider_file(self) -> None:
        """An existing 0644 agent.json is replaced by a 0600 one."""
        self.zero_umask()
        directory = self.state_dir('{"agent_id": "old"}')
        path = os.path.join(directory, AGENT_STATE_FILENAME)
        os.chmod(path, 0o644)
        write_agent_state(directory, AgentState("new"))
        self.assertEqual(file_mode(path), 0o600)
        self.assertEqual(load_agent_state(directory).agent_id, "new")

    def test_creates_directory_0700(self) -> None:
        """A missing state directory (and parents) is created 0700, even with umask 0."""
        self.zero_umask()
        parent = self.mktemp()
        directory = os.path.join(parent, "state")
        write_agent_state(directory, AgentState("a"))
        self.assertEqual(file_mode(directory), 0o700)
        self.assertEqual(file_mode(parent), 0o700)
        self.assertEqual(load_agent_state(directory).agent_id, "a")

    def test_atomic_never_visible_wider(self) -> None:
        """
        The content goes to an O_EXCL temporary file in the same directory that
        is already 0600 and complete when renamed over the target, so there is
        no moment when agent.json is partial or readable by others.
        """
        self.zero_umask()
        directory = self.state_dir('{"agent_id": "old"}')
        path = os.path.join(directory, AGENT_STATE_FILENAME)
        real_open, real_replace = os.open, os.replace
        opened: list[tuple[str, int, int]] = []
        renames: list[tuple[str, int, bytes, bytes]] = []

        def spy_open(file: str, flags: int, mode: int = 0o777, **kw: Any) -> int:
            opened.append((file, flags, mode))
            return real_open(file, flags, mode, **kw)

        def spy_replace(src: str, dst: str) -> None:
            with open(src, "rb") as f:
                new = f.read()
            with open(dst, "rb") as f:
                old = f.read()
            renames.append((src, file_mode(src), new, old))
            real_replace(src, dst)

        self.patch(os, "open", spy_open)
        self.patch(os, "replace", spy_replace)
        write_agent_state(directory, AgentState("new"))

        self.assertEqual(len(renames), 1)
        temp, mode, new, old = renames[0]
        self.assertEqual(os.path.dirname(temp), directory)
        self.assertNotEqual(temp, path)
        self.assertEqual(mode, 0o600)
        self.assertEqual(json.loads(new), {"agent_id": "new"})
        self.assertEqual(json.loads(old), {"agent_id": "old"})
        creates = [(f, fl, m) for f, fl, m in opened if f == temp]
        self.assertEqual(len(creates), 1)
        _, flags, create_mode = creates[0]
        self.assertEqual(flags & (os.O_CREAT | os.O_EXCL), os.O_CREAT | os.O_EXCL)
        self.assertEqual(create_mode, 0o600)
        self.assertEqual(os.listdir(directory), [AGENT_STATE_FILENAME])

    def test_failed_write_keeps_old_file(self) -> None:
        """A failure before the rename leaves the old file and no temporary file."""
        directory = self.state_dir('{"agent_id": "old"}')

        def failing_fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(os, "fsync", failing_fsync)
        error = assert_raises_kind(
            self, IdentityErrorKind.WRITE_FAILED, write_agent_state, directory, AgentState("new")
        )
        self.assertIn(os.path.join(directory, AGENT_STATE_FILENAME), str(error))
        self.assertIn("No space left", str(error))
        self.assertEqual(os.listdir(directory), [AGENT_STATE_FILENAME])
        self.assertEqual(load_agent_state(directory).agent_id, "old")

    def test_unwritable_location(self) -> None:
        """A state path under a regular file cannot be written: WRITE_FAILED."""
        blocker = self.write_file(self.mktemp(), b"not a directory")
        directory = os.path.join(blocker, "state")
        error = assert_raises_kind(
            self, IdentityErrorKind.WRITE_FAILED, write_agent_state, directory, AgentState("a")
        )
        self.assertIsInstance(error, IdentityError)
        self.assertIn(os.path.join(directory, AGENT_STATE_FILENAME), str(error))
        self.assertIn("writable directory", str(error))


# --------------------------------------------------------------------------


class PrivateKeyLoadTests(_TempDirMixin, SynchronousTestCase):
    """load_private_key: RSA PKCS#1/PKCS#8 >= 2048 bits at 0600, nothing else."""

    def assertKeyError(self, path: str, kind: IdentityErrorKind, *needles: str) -> IdentityError:
        """Loading C{path} raises exactly C{kind}, naming the path and a fix."""
        error = self.assertRaises(IdentityError, load_private_key, path)
        self.assertIs(error.kind, kind, str(error))
        self.assertEqual(error.kind.subject, "private_key")
        self.assertIn(path, str(error))
        self.assertEqual(error.path, path)
        self.assertIn("Fix: ", str(error))
        for needle in needles:
            self.assertIn(needle, str(error))
        return error

    def assertNoKeyMaterial(self, error: Exception, pem_data: bytes) -> None:
        for line in body_lines(pem_data):
            self.assertNotIn(line[:16], str(error))

    def test_pkcs1(self) -> None:
        """A PKCS#1 ("RSA PRIVATE KEY") file, as the Go agent writes, loads."""
        key = rsa_key()
        data = pem(key, PKCS1)
        self.assertTrue(data.startswith(b"-----BEGIN RSA PRIVATE KEY-----"))
        loaded = load_private_key(self.key_file(data))
        self.assertEqual(loaded.private_numbers(), key.private_numbers())

    def test_pkcs8(self) -> None:
        """A PKCS#8 ("PRIVATE KEY") file holding RSA loads."""
        key = rsa_key()
        data = pem(key, PKCS8)
        self.assertTrue(data.startswith(b"-----BEGIN PRIVATE KEY-----"))
        loaded = load_private_key(self.key_file(data))
        self.assertEqual(loaded.private_numbers(), key.private_numbers())

    def test_larger_key(self) -> None:
        """Keys over 2048 bits are fine."""
        key = rsa_key(3072)
        self.assertEqual(load_private_key(self.key_file(pem(key, PKCS1))).key_size, 3072)

    def test_owner_only_modes(self) -> None:
        """0600, 0400 and 0700 allow nobody but the owner: accepted."""
        for mode in (0o600, 0o400, 0o700):
            load_private_key(self.key_file(pem(rsa_key(), PKCS1), mode))

    def test_text_around_block(self) -> None:
        """Text before the PEM block (openssl's "Bag Attributes") is ignored."""
        data = b"Bag Attributes\n    localKeyID: 01\n" + pem(rsa_key(), PKCS8) + b"\ntrailer\n"
        load_private_key(self.key_file(data))

    def test_unsafe_permissions(self) -> None:
        """Group- or other-accessible key files are refused, naming chmod 600."""
        for mode in (0o644, 0o660, 0o604, 0o640, 0o620, 0o602, 0o606, 0o666, 0o610):
            path = self.key_file(pem(rsa_key(), PKCS1), mode)
            error = self.assertKeyError(
                path,
                IdentityErrorKind.PRIVATE_KEY_PERMISSIONS,
                f"chmod 600 {path}",
                f"mode {mode:04o}",
            )
            self.assertEqual(error.fix, f"chmod 600 {path}")

    def test_unsafe_permissions_checked_first(self) -> None:
        """Permissions are refused before the contents are even parsed."""
        path = self.key_file(b"garbage", 0o644)
        self.assertKeyError(path, IdentityErrorKind.PRIVATE_KEY_PERMISSIONS)

    def test_missing(self) -> None:
        """
        A missing key file says so, with a fix: plain init (it completes a
        half-made pair; --force is not needed) on the key's own directory.
        """
        directory = self.make_dir()
        path = os.path.join(directory, "agent.key")
        error = self.assertKeyError(
            path,
            IdentityErrorKind.PRIVATE_KEY_MISSING,
            "does not exist",
            f"'hostlink-tw init --state-path {shlex.quote(directory)}'",
        )
        self.assertNotIn("--force", str(error))
        self.assertNotIn("regist", str(error))

    def test_directory(self) -> None:
        """A directory at the key path is unreadable."""
        path = self.make_dir()
        self.assertKeyError(path, IdentityErrorKind.PRIVATE_KEY_UNREADABLE, "is a directory")

    def test_permission_denied(self) -> None:
        """EACCES is unreadable, with a fix about the running user."""
        path = self.key_file(pem(rsa_key(), PKCS1))
        self.patch(_files, "_open_readonly", simulate_eacces)
        self.assertKeyError(
            path, IdentityErrorKind.PRIVATE_KEY_UNREADABLE, "permission denied", "user"
        )

    def test_fifo(self) -> None:
        """A FIFO is refused without blocking."""
        path = os.path.join(self.make_dir(), "agent.key")
        os.mkfifo(path, 0o600)
        self.assertKeyError(path, IdentityErrorKind.PRIVATE_KEY_UNREADABLE, "not a regular file")

    def test_empty(self) -> None:
        """Empty and whitespace-only files are PRIVATE_KEY_EMPTY (a key file problem)."""
        for data in (b"", b"\n \n"):
            self.assertKeyError(
                self.key_file(data), IdentityErrorKind.PRIVATE_KEY_EMPTY, "is empty"
            )

    def test_garbage(self) -> None:
        """Random bytes, DER and text are not PEM."""
        der = rsa_key().private_bytes(
            serialization.Encoding.DER, PKCS1, serialization.NoEncryption()
        )
        for data in (b"hello", os.urandom(300), der):
            self.assertKeyError(
                self.key_file(data), IdentityErrorKind.PRIVATE_KEY_FORMAT, "not a PEM file"
            )

    def test_truncated(self) -> None:
        """A BEGIN line without its END line."""
        data = pem(rsa_key(), PKCS1)
        path = self.key_file(data[: len(data) // 2])
        error = self.assertKeyError(path, IdentityErrorKind.PRIVATE_KEY_FORMAT, "no matching END")
        self.assertNoKeyMaterial(error, data)

    def test_corrupt_block(self) -> None:
        """A well-framed block whose contents are not a key."""
        data = b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"
        self.assertKeyError(
            self.key_file(data), IdentityErrorKind.PRIVATE_KEY_FORMAT, "cannot be decoded"
        )

    def test_public_key_or_certificate(self) -> None:
        """A public key where the private key belongs says what it is."""
        path = self.key_file(public_key_pem(rsa_key()).encode())
        self.assertKeyError(path, IdentityErrorKind.PRIVATE_KEY_FORMAT, "holds a PUBLIC KEY")

    def test_first_block_is_used(self) -> None:
        """As with Go's pem.Decode, only the first PEM block counts."""
        data = public_key_pem(rsa_key()).encode() + pem(rsa_key(), PKCS1)
        self.assertKeyError(self.key_file(data), IdentityErrorKind.PRIVATE_KEY_FORMAT, "PUBLIC KEY")

    def test_openssh_format(self) -> None:
        """An OpenSSH-format key gets the ssh-keygen conversion as its fix."""
        data = pem(rsa_key(), serialization.PrivateFormat.OpenSSH)
        path = self.key_file(data)
        error = self.assertKeyError(
            path, IdentityErrorKind.PRIVATE_KEY_FORMAT, "OpenSSH", "ssh-keygen"
        )
        self.assertNoKeyMaterial(error, data)

    def test_encrypted_pkcs8(self) -> None:
        """An encrypted PKCS#8 key is refused without asking for a password."""
        data = pem(rsa_key(), PKCS8, password=b"secret")
        self.assertTrue(data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"))
        error = self.assertKeyError(
            self.key_file(data), IdentityErrorKind.PRIVATE_KEY_ENCRYPTED, "encrypted", "openssl rsa"
        )
        self.assertNoKeyMaterial(error, data)

    def test_encrypted_pkcs1(self) -> None:
        """A legacy encrypted PKCS#1 key (Proc-Type: 4,ENCRYPTED) is refused too."""
        data = pem(rsa_key(), PKCS1, password=b"secret")
        self.assertIn(b"Proc-Type: 4,ENCRYPTED", data)
        self.assertKeyError(
            self.key_file(data), IdentityErrorKind.PRIVATE_KEY_ENCRYPTED, "encrypted"
        )

    def test_ec(self) -> None:
        """EC keys, SEC1 or PKCS#8, are not RSA."""
        for fmt in (PKCS1, PKCS8):
            data = pem(ec_key(), fmt)
            error = self.assertKeyError(
                self.key_file(data), IdentityErrorKind.PRIVATE_KEY_NOT_RSA, "EC", "not an RSA"
            )
            self.assertNoKeyMaterial(error, data)

    def test_ed25519(self) -> None:
        """Ed25519 keys are not RSA."""
        data = pem(ed25519_key(), PKCS8)
        self.assertKeyError(
            self.key_file(data), IdentityErrorKind.PRIVATE_KEY_NOT_RSA, "Ed25519", "not an RSA"
        )

    def test_dsa(self) -> None:
        """DSA keys are not RSA."""
        for fmt in (PKCS1, PKCS8):
            self.assertKeyError(
                self.key_file(pem(dsa_key(), fmt)), IdentityErrorKind.PRIVATE_KEY_NOT_RSA, "DSA"
            )

    def test_too_small(self) -> None:
        """A 1024-bit RSA key is refused, in either format, naming its size."""
        for fmt in (PKCS1, PKCS8):
            data = pem(rsa_key(1024), fmt)
            error = self.assertKeyError(
                self.key_file(data), IdentityErrorKind.PRIVATE_KEY_TOO_SMALL, "1024-bit", "2048"
            )
            self.assertNoKeyMaterial(error, data)

    def test_error_kinds(self) -> None:
        """Every key problem is about the private key, not the agent state."""
        for kind in (
            IdentityErrorKind.PRIVATE_KEY_MISSING,
            IdentityErrorKind.PRIVATE_KEY_UNREADABLE,
            IdentityErrorKind.PRIVATE_KEY_PERMISSIONS,
            IdentityErrorKind.PRIVATE_KEY_FORMAT,
            IdentityErrorKind.PRIVATE_KEY_EMPTY,
            IdentityErrorKind.PRIVATE_KEY_ENCRYPTED,
            IdentityErrorKind.PRIVATE_KEY_NOT_RSA,
            IdentityErrorKind.PRIVATE_KEY_TOO_SMALL,
            IdentityErrorKind.PRIVATE_KEY_EXISTS,
        ):
            self.assertEqual(kind.subject, "private_key", kind)
            self.assertNotEqual(kind.subject, "agent_state", kind)


class GenerateKeyTests(_TempDirMixin, SynchronousTestCase):
    """generate_private_key: PKCS#1 PEM, 0600 from creation, atomic."""

    def test_generates_loadable_pkcs1(self) -> None:
        """The file is an unencrypted PKCS#1 PEM that load_private_key accepts."""
        path = os.path.join(self.make_dir(), "agent.key")
        key = generate_private_key(path)
        self.assertEqual(key.key_size, 2048)
        with open(path, "rb") as f:
            data = f.read()
        self.assertTrue(data.startswith(b"-----BEGIN RSA PRIVATE KEY-----\n"))
        self.assertNotIn(b"ENCRYPTED", data)
        self.assertEqual(load_private_key(path).private_numbers(), key.private_numbers())

    def test_mode_0600_with_umask_0(self) -> None:
        """0600 whatever the umask; a missing directory is created 0700."""
        self.zero_umask()
        directory = os.path.join(self.mktemp(), "hostlink")
        path = os.path.join(directory, "agent.key")
        generate_private_key(path)
        self.assertEqual(file_mode(path), 0o600)
        self.assertEqual(file_mode(directory), 0o700)
        self.assertEqual(os.listdir(directory), ["agent.key"])

    def test_never_world_readable(self) -> None:
        """
        The key is created 0600 with O_EXCL under a temporary name in the same
        directory, and is complete and 0600 when renamed into place.
        """
        self.zero_umask()
        directory = self.make_dir()
        path = os.path.join(directory, "agent.key")
        real_open, real_replace = os.open, os.replace
        creates: list[tuple[str, int, int]] = []
        renames: list[tuple[str, int, bytes]] = []

        def spy_open(file: str, flags: int, mode: int = 0o777, **kw: Any) -> int:
            if flags & os.O_CREAT:
                creates.append((file, flags, mode))
            return real_open(file, flags, mode, **kw)

        def spy_replace(src: str, dst: str) -> None:
            with open(src, "rb") as f:
                renames.append((src, file_mode(src), f.read()))
            real_replace(src, dst)

        self.patch(os, "open", spy_open)
        self.patch(os, "replace", spy_replace)
        generate_private_key(path)

        self.assertEqual(len(creates), 1)
        temp, flags, mode = creates[0]
        self.assertEqual(os.path.dirname(temp), directory)
        self.assertTrue(flags & os.O_EXCL)
        self.assertEqual(mode, 0o600)
        self.assertEqual(len(renames), 1)
        self.assertEqual(renames[0][0], temp)
        self.assertEqual(renames[0][1], 0o600)
        self.assertTrue(renames[0][2].rstrip().endswith(b"-----END RSA PRIVATE KEY-----"))

    def test_larger(self) -> None:
        """More than 2048 bits may be asked for."""
        path = os.path.join(self.make_dir(), "agent.key")
        self.assertEqual(generate_private_key(path, bits=3072).key_size, 3072)
        self.assertEqual(load_private_key(path).key_size, 3072)

    def test_too_small(self) -> None:
        """Below 2048 bits is refused and nothing is written."""
        directory = self.make_dir()
        path = os.path.join(directory, "agent.key")
        error = assert_raises_kind(
            self, IdentityErrorKind.PRIVATE_KEY_TOO_SMALL, generate_private_key, path, 1024
        )
        self.assertIn(path, str(error))
        self.assertIn("2048", str(error))
        self.assertEqual(os.listdir(directory), [])

    def test_bits_type(self) -> None:
        """bits must be an int (True is not 1 bit)."""
        path = os.path.join(self.make_dir(), "agent.key")
        self.assertRaises(TypeError, generate_private_key, path, True)
        self.assertRaises(TypeError, generate_private_key, path, 2048.0)

    def test_overwrite_default_replaces(self) -> None:
        """By default an existing key (even a 0644 one) is replaced by a 0600 one."""
        path = self.key_file(pem(rsa_key(), PKCS1), 0o644)
        new = generate_private_key(path)
        self.assertEqual(file_mode(path), 0o600)
        self.assertEqual(load_private_key(path).private_numbers(), new.private_numbers())

    def test_no_overwrite(self) -> None:
        """overwrite=False keeps an existing key and says so."""
        original = pem(rsa_key(), PKCS1)
        path = self.key_file(original)
        error = assert_raises_kind(
            self, IdentityErrorKind.PRIVATE_KEY_EXISTS, generate_private_key, path, overwrite=False
        )
        self.assertIn(path, str(error))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), original)
        self.assertEqual(os.listdir(os.path.dirname(path)), ["agent.key"])

    def test_no_overwrite_new_file(self) -> None:
        """overwrite=False writes a key where there is none."""
        path = os.path.join(self.make_dir(), "agent.key")
        key = generate_private_key(path, overwrite=False)
        self.assertEqual(load_private_key(path).private_numbers(), key.private_numbers())
        self.assertEqual(file_mode(path), 0o600)

    def test_unwritable(self) -> None:
        """A key path under a regular file raises WRITE_FAILED naming it."""
        blocker = self.write_file(self.mktemp(), b"x")
        path = os.path.join(blocker, "agent.key")
        error = assert_raises_kind(self, IdentityErrorKind.WRITE_FAILED, generate_private_key, path)
        self.assertIn(path, str(error))


# --------------------------------------------------------------------------


class PublicKeyTests(SynchronousTestCase):
    """public_key_base64 / public_key_pem / load_public_key."""

    def test_base64_is_pkix_der(self) -> None:
        """Standard base64 (padded, one line) of the SubjectPublicKeyInfo DER."""
        key = rsa_key()
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        text = public_key_base64(key)
        self.assertEqual(text, base64.b64encode(der).decode("ascii"))
        self.assertEqual(public_key_base64(key.public_key()), text)
        self.assertNotIn("\n", text)
        # The PKIX header of a 2048-bit RSA key; PKCS#1 would start "MIIBCgKCAQEA".
        self.assertTrue(text.startswith("MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A"), text[:32])

    def test_pem(self) -> None:
        """PEM of the same SubjectPublicKeyInfo."""
        key = rsa_key()
        text = public_key_pem(key)
        self.assertTrue(text.startswith("-----BEGIN PUBLIC KEY-----\n"))
        self.assertEqual(public_key_pem(key.public_key()), text)
        body = "".join(text.strip().splitlines()[1:-1])
        self.assertEqual(body, public_key_base64(key))

    def test_export_refuses_other_types(self) -> None:
        """Exporting a non-RSA key is a programming error."""
        self.assertRaises(TypeError, public_key_base64, ec_key())
        self.assertRaises(TypeError, public_key_pem, "key")

    def test_load_round_trips(self) -> None:
        """base64 (also wrapped), PEM and PKCS#1 PEM all load to the same key."""
        key = rsa_key()
        expected = key.public_key().public_numbers()
        b64 = public_key_base64(key)
        wrapped = "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
        pkcs1_pem = (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
            .decode()
        )
        for text in (b64, f"  {b64}\n", wrapped, public_key_pem(key), pkcs1_pem):
            self.assertEqual(load_public_key(text).public_numbers(), expected)

    def test_load_refuses(self) -> None:
        """Anything that is not an RSA public key raises PUBLIC_KEY."""
        ec_b64 = base64.b64encode(
            ec_key()
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).decode()
        private_pem = pem(rsa_key(), PKCS1).decode()
        cases: list[tuple[Any, str]] = [
            ("", "empty"),
            ("   ", "empty"),
            ("not base64!", "neither PEM nor standard base64"),
            ("AAAA-_", "neither PEM nor standard base64"),
            ("héllo", "neither PEM nor standard base64"),
            (base64.b64encode(b"garbage").decode(), "does not decode"),
            (ec_b64, "not RSA"),
            (private_pem, "PEM text is not a valid public key"),
            ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "PEM text"),
            (b"bytes", "must be text"),
            (None, "must be text"),
        ]
        for text, needle in cases:
            error = assert_raises_kind(self, IdentityErrorKind.PUBLIC_KEY, load_public_key, text)
            self.assertIsInstance(error, IdentityError)
            self.assertIn(needle, str(error), repr(text))
            self.assertIn("Fix: ", str(error))
        # The private key handed in by mistake is not echoed back.
        error = assert_raises_kind(self, IdentityErrorKind.PUBLIC_KEY, load_public_key, private_pem)
        for line in body_lines(private_pem.encode()):
            self.assertNotIn(line[:16], str(error))


class PermissionWarningTests(_TempDirMixin, SynchronousTestCase):
    """Issue 10.16: one warning line for files others could replace."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.patch(identity, "log", Logger(observer=self.events.append))
        self.patch(provisioning, "log", Logger(observer=self.events.append))

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] == LogLevel.warn]

    def test_private_files_give_no_warning(self) -> None:
        directory = self.state_dir('{"agent_id": "a"}')
        os.chmod(directory, 0o700)
        load_agent_state(directory)
        key_path = os.path.join(directory, "agent.key")
        generate_private_key(key_path)
        load_private_key(key_path)
        self.assertEqual(self.warnings(), [])

    def test_state_directory_writable_by_others(self) -> None:
        directory = self.state_dir('{"agent_id": "a"}')
        for mode in (0o770, 0o707, 0o1777):
            self.events.clear()
            os.chmod(directory, mode)
            load_agent_state(directory)
            [line] = self.warnings()
            self.assertIn(f"state directory {directory} is writable by group or others", line)
            self.assertIn(f"chmod go-w {directory}", line)

    def test_agent_json_writable_by_others(self) -> None:
        directory = self.state_dir('{"agent_id": "a"}')
        os.chmod(directory, 0o700)
        path = os.path.join(directory, AGENT_STATE_FILENAME)
        os.chmod(path, 0o662)
        self.assertEqual(load_agent_state(directory).agent_id, "a")  # a warning, not a refusal
        [line] = self.warnings()
        self.assertIn(f"agent state file {path} is writable by group or others (mode 0662)", line)

    def test_key_owned_by_another_user(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("only root can give a file to another user")
        key_path = os.path.join(self.make_dir(), "agent.key")
        generate_private_key(key_path)
        os.chown(key_path, 65534, -1)
        load_private_key(key_path)  # still loads: a warning
        [line] = self.warnings()
        self.assertIn(f"private key file {key_path} is owned by uid 65534", line)
        self.assertIn("uid 0", line)


class KeyPathTests(_TempDirMixin, SynchronousTestCase):
    """Issue 9.8: the key path when HOSTLINK_PRIVATE_KEY_PATH is unset."""

    def setUp(self) -> None:
        self.go_key = os.path.join(self.make_dir(), "agent.key")
        self.patch(identity, "GO_DEFAULT_PRIVATE_KEY_PATH", self.go_key)
        self.events: list[dict[str, Any]] = []
        self.logger = Logger(observer=self.events.append)

    def test_state_path_key_when_nothing_exists(self) -> None:
        state = self.make_dir()
        path = default_private_key_path(state, self.logger)
        self.assertEqual(path, os.path.join(state, "agent.key"))
        self.assertEqual(self.events, [])

    def test_state_path_key_wins_over_the_go_default(self) -> None:
        state = self.make_dir()
        self.write_file(self.go_key, b"x")
        self.write_file(os.path.join(state, "agent.key"), b"y")
        self.assertEqual(default_private_key_path(state), os.path.join(state, "agent.key"))

    def test_go_default_when_only_it_exists(self) -> None:
        state = self.make_dir()
        self.write_file(self.go_key, b"x")
        self.assertEqual(default_private_key_path(state, self.logger), self.go_key)
        [event] = self.events
        self.assertIn("using the Go agent's key", formatEvent(event))
        self.assertEqual(event["path"], self.go_key)


class WriteIdentityTests(_TempDirMixin, SynchronousTestCase):
    """Issue 10.7: write_identity changes both files or neither."""

    def test_writes_both(self) -> None:
        state = os.path.join(self.make_dir(), "state")
        key_path = os.path.join(state, "agent.key")
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        write_identity(state, key_path, AgentState("agt_1"), key)
        self.assertEqual(load_agent_state(state).agent_id, "agt_1")
        self.assertEqual(public_key_base64(load_private_key(key_path)), public_key_base64(key))
        self.assertEqual(file_mode(key_path), 0o600)
        self.assertEqual(sorted(os.listdir(state)), ["agent.json", "agent.key"])

    def test_state_only_keeps_the_key(self) -> None:
        state = self.make_dir()
        key_path = os.path.join(state, "agent.key")
        generate_private_key(key_path)
        with open(key_path, "rb") as f:
            before = f.read()
        write_identity(state, key_path, AgentState("agt_2"))
        with open(key_path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(load_agent_state(state).agent_id, "agt_2")

    def test_failed_key_write_changes_nothing(self) -> None:
        state = self.make_dir()
        write_agent_state(state, AgentState("old"))
        key_path = os.path.join(state, "sub", "agent.key")
        os.makedirs(key_path)  # the key's place is a directory: its rename fails
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        assert_raises_kind(
            self,
            IdentityErrorKind.WRITE_FAILED,
            write_identity,
            state,
            key_path,
            AgentState("new"),
            key,
        )
        self.assertEqual(load_agent_state(state).agent_id, "old")
        self.assertEqual(sorted(os.listdir(state)), ["agent.json", "sub"])
        self.assertEqual(os.listdir(os.path.dirname(key_path)), ["agent.key"])


class IdentityHintTests(_TempDirMixin, SynchronousTestCase):
    """The commands in identity fixes act on this identity, quoted, --force only if needed."""

    def test_init_command(self) -> None:
        self.assertEqual(
            identity.init_command("./oj2", "./oj2/agent.key", force=False),
            "hostlink-tw init --state-path ./oj2",
        )
        self.assertEqual(
            identity.init_command("/s p", "/k/x.pem", force=True),
            "hostlink-tw init --force --state-path '/s p' --private-key-path /k/x.pem",
        )
        self.assertEqual(
            identity.identity_show_command("/s", "/k/x.pem"),
            "hostlink-tw identity show --state-path /s --private-key-path /k/x.pem",
        )

    def test_missing_key_elsewhere(self) -> None:
        """A missing key outside the state directory: the fix names both paths."""
        state = self.make_dir()
        key = os.path.join(self.make_dir(), "my key.pem")
        error = self.assertRaises(IdentityError, load_private_key, key, state_path=state)
        self.assertIn(
            f"'hostlink-tw init --state-path {shlex.quote(state)} "
            f"--private-key-path {shlex.quote(key)}'",
            str(error),
        )

    def test_missing_key_without_state_path(self) -> None:
        """
        Without the state path: agent.key implies its directory; another name
        gets an explained placeholder rather than a wrong directory.
        """
        directory = self.make_dir()
        error = self.assertRaises(
            IdentityError, load_private_key, os.path.join(directory, "agent.key")
        )
        self.assertIn(f"'hostlink-tw init --state-path {shlex.quote(directory)}'", str(error))
        other = os.path.join(directory, "k.pem")
        error = self.assertRaises(IdentityError, load_private_key, other)
        self.assertIn(
            f"'hostlink-tw init --state-path STATE_DIR --private-key-path {shlex.quote(other)}' "
            "(STATE_DIR: the directory that holds agent.json)",
            str(error),
        )

    def test_unusable_key_needs_force(self) -> None:
        """An existing unusable key: init refuses it without --force, so the fix has it."""
        state = self.make_dir()
        key = os.path.join(state, "agent.key")
        with open(key, "w") as f:
            f.write("garbage\n")
        os.chmod(key, 0o600)
        error = self.assertRaises(IdentityError, load_private_key, key, state_path=state)
        self.assertIn(f"'hostlink-tw init --force --state-path {shlex.quote(state)}'", str(error))

    def test_missing_state_names_key_path(self) -> None:
        """A missing agent.json with a key elsewhere: init must be told that key path."""
        state = self.make_dir()
        error = self.assertRaises(
            IdentityError, load_agent_state, state, private_key_path="/etc/k.pem"
        )
        self.assertIn(
            f"'hostlink-tw init --state-path {shlex.quote(state)} --private-key-path /etc/k.pem'",
            str(error),
        )

    def test_same_file(self) -> None:
        """The key path being agent.json (by path or by inode) is named as a problem."""
        state = self.make_dir()
        state_file = os.path.join(state, "agent.json")
        self.assertIsNone(identity.same_file_problem(state, os.path.join(state, "agent.key")))
        problem = identity.same_file_problem(state, os.path.join(state, ".", "agent.json"))
        assert problem is not None
        self.assertIn(state_file, problem)
        with open(state_file, "w") as f:
            f.write("{}")
        other = os.path.join(self.make_dir(), "link.key")
        os.link(state_file, other)
        problem = identity.same_file_problem(state, other)
        assert problem is not None
        self.assertIn(other, problem)
        self.assertIn(state_file, problem)
