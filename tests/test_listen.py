"""L{hostlink_tw._listen}: why an endpoint could not listen, in one line."""

from __future__ import annotations

import errno
import os

from twisted.internet.error import CannotListenError
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw._listen import listen_failure


class ListenFailureTests(SynchronousTestCase):
    def test_busy_port_is_cannot_listen(self) -> None:
        error = CannotListenError("127.0.0.1", 8080, OSError(errno.EADDRINUSE, "in use"))
        self.assertEqual(
            listen_failure(error, "--listen"),
            "port 8080 is already in use by another process: stop that process, "
            "or choose another port with --listen",
        )

    def test_port_out_of_range(self) -> None:
        expected = "port out of range (ports are 1-65535): choose another port with --listen"
        self.assertEqual(
            listen_failure(OverflowError("bind(): port must be 0-65535."), "--listen"), expected
        )
        self.assertEqual(listen_failure(ValueError("bad port 70000"), "--listen"), expected)

    def test_lock_file_in_missing_directory(self) -> None:
        """Twisted makes a unix socket's lock file as a symlink to the pid."""
        missing = os.path.abspath(self.mktemp())
        error = FileNotFoundError(
            errno.ENOENT, "No such file or directory", "123", None,
            os.fsencode(os.path.join(missing, "sock.lock")),
        )
        self.assertEqual(
            listen_failure(error, "--listen"),
            f"directory {missing} does not exist: create it, or choose another path with --listen",
        )

    def test_unix_socket_without_lock_file(self) -> None:
        missing = os.path.abspath(self.mktemp())
        path = os.fsencode(os.path.join(missing, "sock"))
        error = CannotListenError(None, path, FileNotFoundError(errno.ENOENT, "No such file"))
        self.assertEqual(
            listen_failure(error, "--listen"),
            f"directory {missing} does not exist: create it, or choose another path with --listen",
        )

    def test_unix_path_in_existing_directory(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "sock")
        error = PermissionError(errno.EACCES, "Permission denied", path)
        self.assertEqual(
            listen_failure(error, "--listen"),
            f"cannot create {path}: Permission denied: choose another path with --listen",
        )

    def test_anything_else_is_type_and_message_on_one_line(self) -> None:
        self.assertEqual(listen_failure(RuntimeError("odd"), "--listen"), "RuntimeError: odd")
        self.assertEqual(
            listen_failure(RuntimeError("two\nlines"), "--listen"), "RuntimeError: two lines"
        )
