"""
The operator API's token file (controlplane/operatortoken.py) and how
``twistd hostlink-controlplane`` creates, reads and refuses it.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.controlplane import operatortoken
from hostlink_tw.controlplane.operatorapi import _tail
from hostlink_tw.controlplane.operatortoken import (
    OperatorTokenError,
    load_or_create_token,
    read_token_file,
    token_file_beside,
    tokens_equal,
)
from hostlink_tw.controlplane.tap import Options
from hostlink_tw.identity import public_key_base64

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class TokenFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "operator.token")

    def write(self, text: str, file_mode: int = 0o600) -> None:
        with open(self.path, "w") as f:
            f.write(text)
        os.chmod(self.path, file_mode)

    def test_created_0600_then_read_back(self) -> None:
        previous = os.umask(0)  # the file's mode must not depend on the umask
        self.addCleanup(os.umask, previous)
        token, created = load_or_create_token(self.path)
        self.assertTrue(created)
        self.assertEqual(mode(self.path), 0o600)
        self.assertGreaterEqual(len(token), 43)
        self.assertEqual(load_or_create_token(self.path), (token, False))
        self.assertEqual(read_token_file(self.path), token)
        # Complete or not at all: no temporary file left beside it.
        self.assertEqual(os.listdir(self.dir), ["operator.token"])

    def test_each_new_file_has_a_new_token(self) -> None:
        first, _ = load_or_create_token(self.path)
        os.unlink(self.path)
        second, _ = load_or_create_token(self.path)
        self.assertNotEqual(first, second)

    def test_readable_by_group_or_others_is_refused_and_kept(self) -> None:
        for unsafe in (0o644, 0o640, 0o604, 0o620, 0o602):
            self.write("a-perfectly-fine-token-value\n", unsafe)
            with self.assertRaises(OperatorTokenError) as raised:
                load_or_create_token(self.path)
            self.assertIn("chmod 600", str(raised.exception))
            self.assertIn(f"{unsafe:04o}", str(raised.exception))
            with open(self.path) as f:
                self.assertEqual(f.read(), "a-perfectly-fine-token-value\n")

    def test_a_given_token_is_used(self) -> None:
        self.write("  my-own-token-of-enough-length \n")
        self.assertEqual(load_or_create_token(self.path), ("my-own-token-of-enough-length", False))

    def test_unusable_contents_are_refused_not_replaced(self) -> None:
        for text in ("", "short", "has spaces inside it ok", "x" * 2000, "tab\tinside-the-token",
                     "\xe9" * 20):
            self.write(text)
            self.assertRaises(OperatorTokenError, load_or_create_token, self.path)
            with open(self.path) as f:
                self.assertEqual(f.read(), text)

    def test_not_a_regular_file(self) -> None:
        os.mkfifo(self.path, 0o600)
        with self.assertRaises(OperatorTokenError) as raised:
            load_or_create_token(self.path)
        self.assertIn("not a regular file", str(raised.exception))
        os.unlink(self.path)
        os.mkdir(self.path, 0o700)
        self.assertRaises(OperatorTokenError, load_or_create_token, self.path)

    def test_missing_directory(self) -> None:
        path = os.path.join(self.dir, "missing", "operator.token")
        with self.assertRaises(OperatorTokenError) as raised:
            load_or_create_token(path)
        self.assertIn("does not exist", str(raised.exception))

    def test_another_start_creating_it_meanwhile_wins(self) -> None:
        def racing_create(path: str, token: str) -> None:
            with open(path, "w") as f:
                f.write("the-other-start-s-token\n")
            os.chmod(path, 0o600)
            raise FileExistsError(path)

        self.patch(operatortoken, "_create", racing_create)
        self.assertEqual(load_or_create_token(self.path), ("the-other-start-s-token", False))

    def test_beside_the_agents_file(self) -> None:
        self.assertEqual(token_file_beside(os.path.join(self.dir, "agents.json")), self.path)

    def test_comparison(self) -> None:
        self.assertTrue(tokens_equal(b"Bearer abc", b"Bearer abc"))
        self.assertFalse(tokens_equal(b"Bearer abd", b"Bearer abc"))
        self.assertFalse(tokens_equal(b"Bearer ab", b"Bearer abc"))


class TailTests(SynchronousTestCase):
    def test_tail_keeps_whole_characters(self) -> None:
        text = "a" + "\u00e9" * 10  # 21 bytes
        shown, omitted = _tail(text, 6)
        self.assertEqual(shown, "\u00e9" * 3)
        self.assertEqual(omitted, 15)
        self.assertEqual(_tail("short", 10), ("short", 0))


class TwistdOptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.agents = os.path.join(self.dir, "agents.json")
        with open(self.agents, "w") as f:
            json.dump({"agent-1": public_key_base64(KEY)}, f)

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(["--agents", self.agents, "--database", "none",
                              "--tasks-database", "none", *args])
        return options

    def test_first_start_writes_operator_token_beside_the_agents_file(self) -> None:
        options = self.parse()
        path = os.path.join(self.dir, "operator.token")
        self.assertEqual(options.operator_token_file, path)
        self.assertTrue(options.operator_token_created)
        self.assertEqual(mode(path), 0o600)
        self.assertEqual(read_token_file(path), options.operator_token)
        again = self.parse()
        self.assertEqual(again.operator_token, options.operator_token)
        self.assertFalse(again.operator_token_created)

    def test_operator_token_file_option(self) -> None:
        path = os.path.join(self.dir, "elsewhere.token")
        options = self.parse("--operator-token-file", path)
        self.assertEqual(read_token_file(path), options.operator_token)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "operator.token")))

    def test_unsafe_token_file_is_a_usage_error(self) -> None:
        path = os.path.join(self.dir, "operator.token")
        with open(path, "w") as f:
            f.write("an-existing-token-value\n")
        os.chmod(path, 0o644)
        with self.assertRaises(usage.UsageError) as raised:
            self.parse()
        message = str(raised.exception)
        self.assertTrue(message.startswith("--operator-token-file: operator token file"), message)
        self.assertNotIn("\n", message)
        self.assertNotIn("an-existing-token-value", message)

    def test_no_operator_listener_no_token(self) -> None:
        options: Any = self.parse("--operator-listen", "none")
        self.assertIsNone(options.operator_token)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "operator.token")))

    def test_settings_are_unchanged(self) -> None:
        """The token is not a ControlPlane keyword: it goes to the operator listener."""
        self.assertNotIn("operator_token", self.parse().settings)
