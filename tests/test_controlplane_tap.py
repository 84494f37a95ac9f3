"""Tests for L{hostlink_tw.controlplane.tap}: twistd options and the service."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from types import FrameType
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import TestCase

from hostlink_tw.controlplane.tap import ControlPlaneService, Options, makeService
from hostlink_tw.identity import public_key_base64
from hostlink_tw.testing import make_test_certificates

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


class OptionsTests(TestCase):
    def agents_file(self, agents: dict[str, str] | None = None) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"agent-1": public_key_base64(KEY)} if agents is None else agents, f)
        return path

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(list(args))
        return options

    def test_defaults(self) -> None:
        path = self.agents_file()
        options = self.parse("--agents", path)
        self.assertEqual(options["listen"], "tcp:8080:interface=127.0.0.1")
        self.assertEqual(options["operator-listen"], "tcp:8081:interface=127.0.0.1")
        self.assertEqual(
            options.settings,
            {
                "agents_file": path,
                "max_skew": 300.0,
                "handshake_timeout": 10.0,
                "ping_interval": 30.0,
                "ping_timeout": 20.0,
                "reload_interval": 1.0,
                "max_message_bytes": 1 << 20,
                "max_connections": 1000,
                "max_pending_connections": 256,
                "max_send_buffer_bytes": 4 << 20,
                "nonce_cache_size": 100_000,
                "nonce_quota": 1000,
                "max_pending_tasks": 1000,
                "max_command_bytes": 64 << 10,
                "max_output_bytes": 64 << 20,
                "delivery_window": 16,
                "delivery_enabled": True,
            },
        )

    def test_task_options(self) -> None:
        path = self.agents_file()
        options = self.parse("--agents", path, "--tasks-database", "none", "--no-delivery",
                             "--delivery-window", "4")
        self.assertEqual(
            (options.settings["tasks_database"], options.settings["delivery_enabled"],
             options.settings["delivery_window"]),
            (False, False, 4),
        )
        error = self.assertRaises(
            usage.UsageError, self.parse, "--agents", path,
            "--tasks-database", os.path.dirname(path),
        )
        self.assertIn("--tasks-database:", str(error))

    def test_values(self) -> None:
        options = self.parse(
            "--agents", self.agents_file(), "--max-skew", "1m30s", "--max-message-bytes", "4096",
            "--ping-interval", "0s", "--listen", "tcp:0",
        )
        self.assertEqual(options.settings["max_skew"], 90.0)
        self.assertEqual(options.settings["max_message_bytes"], 4096)
        self.assertEqual(options.settings["ping_interval"], 0.0)
        self.assertEqual(options["listen"], "tcp:0")

    def test_operator_listen_and_database_can_be_off(self) -> None:
        options = self.parse(
            "--agents", self.agents_file(), "--operator-listen", "none", "--database", "none",
            "--nonce-quota", "5", "--max-pending-connections", "7",
        )
        self.assertIsNone(options["operator-listen"])
        self.assertIs(options.settings["database"], False)
        self.assertEqual(options.settings["nonce_quota"], 5)
        self.assertEqual(options.settings["max_pending_connections"], 7)
        options = self.parse("--agents", self.agents_file(), "--database", "x.db")
        self.assertEqual(options.settings["database"], "x.db")

    def assertUsageError(self, expected: str, *args: str) -> None:
        error = self.assertRaises(usage.UsageError, self.parse, *args)
        self.assertIn(expected, str(error))
        self.assertNotIn("\n", str(error))

    def test_fifo_tls_files_refused(self) -> None:
        """
        Issue 10 item 12: Twisted opens an ssl: endpoint's files with a
        blocking open while parsing; a FIFO there hung twistd's start.
        """
        certificates = make_test_certificates(self.mktemp())
        fifo = self.mktemp()
        os.mkfifo(fifo)
        good = self.agents_file()
        for key in ("privateKey", "certKey"):
            listen = certificates.listen().replace(
                getattr(certificates, "key" if key == "privateKey" else "cert"), fifo
            )
            self.assertIn(fifo, listen)
            self.assertUsageError(
                f"--listen {key}={fifo}: not a regular file", "--agents", good, "--listen", listen
            )
        self.assertUsageError(
            f"--operator-listen privateKey={fifo}: not a regular file",
            "--agents", good, "--operator-listen",
            f"ssl:0:interface=127.0.0.1:privateKey={fifo}:certKey={certificates.cert}",
        )

    def test_bad_options(self) -> None:
        good = self.agents_file()
        self.assertUsageError("--agents FILE is required")
        self.assertUsageError("--max-skew", "--agents", good, "--max-skew", "300")
        self.assertUsageError("must not be negative", "--agents", good, "--max-skew", "-1s")
        self.assertUsageError("--max-connections", "--agents", good, "--max-connections", "0")
        self.assertUsageError("--nonce-cache-size", "--agents", good, "--nonce-cache-size", "1e5")
        self.assertUsageError("--listen", "--agents", good, "--listen", "bogus:1")
        self.assertUsageError(
            "--operator-listen", "--agents", good, "--operator-listen", "bogus:1"
        )
        self.assertUsageError("--nonce-quota", "--agents", good, "--nonce-quota", "0")
        self.assertUsageError(
            "cannot use the database", "--agents", good, "--database", "/nonexistent/x.db"
        )
        fifo = self.mktemp()
        os.mkfifo(fifo)
        self.assertUsageError("must be a regular file", "--agents", good, "--database", fifo)
        self.assertUsageError("cannot read", "--agents", self.mktemp())
        self.assertUsageError("agent 'a'", "--agents", self.agents_file({"a": "nope"}))


class ServiceTests(TestCase):
    @inlineCallbacks
    def test_listen_and_sighup_reload(self) -> Any:
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"agent-1": public_key_base64(KEY)}, f)
        chained: list[int] = []

        def previous(signum: int, frame: FrameType | None) -> None:
            chained.append(signum)

        original = signal.signal(signal.SIGHUP, previous)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        options = Options()
        options.parseOptions(
            ["--agents", path, "--listen", "tcp:0:interface=127.0.0.1", "--reload-interval", "0s",
             "--operator-listen", "tcp:0:interface=127.0.0.1"]
        )
        service = makeService(options)
        self.assertIsInstance(service, ControlPlaneService)
        service.privilegedStartService()
        service.startService()
        stopped = False

        def stop() -> Any:
            if not stopped:
                return service.stopService()
            return None

        self.addCleanup(stop)
        cp = service.control_plane
        self.assertTrue(cp.ws_url.startswith("ws://127.0.0.1:"))
        self.assertTrue(cp.operator_url.startswith("http://127.0.0.1:"))
        self.assertEqual(cp.database, os.path.join(os.path.dirname(os.path.abspath(path)),
                                                   "controlplane.db"))
        with open(path, "w") as f:
            json.dump({"agent-2": public_key_base64(KEY)}, f)
        handler = signal.getsignal(signal.SIGHUP)
        assert callable(handler)
        handler(signal.SIGHUP, None)
        self.assertEqual(chained, [signal.SIGHUP])
        for _ in range(100):
            if "agent-2" in cp.agents:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(sorted(cp.agents), ["agent-2"])
        stopped = True
        yield service.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), previous)


class StartLinesTests(TestCase):
    """
    The start says where each listener is, in words: no "Starting factory
    <…_OperatorSite object at 0x…>", no private class names (a new user's trial).
    """

    @inlineCallbacks
    def test_start_and_stop_lines(self) -> Any:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        agents = self.mktemp()
        with open(agents, "w") as f:
            json.dump({"agent-1": public_key_base64(KEY)}, f)
        options = Options()
        options.parseOptions(
            ["--agents", agents, "--listen", "tcp:0:interface=127.0.0.1", "--reload-interval", "0s",
             "--operator-listen", "tcp:0:interface=127.0.0.1", "--database", "none"]
        )
        service = makeService(options)
        service.privilegedStartService()
        service.startService()
        operator = service.control_plane.operator_url
        yield service.stopService()
        lines = [formatEvent(e) for e in events]
        for line in lines:
            self.assertNotIn("0x", line)
            self.assertNotIn("factory", line.lower())
            self.assertNotIn("Site", line)
        port = operator.rsplit(":", 1)[1]
        self.assertEqual(
            [line for line in lines if "operator" in line],
            [f"operator page starting on {port}", f"operator status page on {operator}/status"],
        )
        self.assertEqual(
            len([line for line in lines if line.startswith("agent gateway ")]), 1, lines
        )


class TwistdRun(TestCase):
    """Runs ``twistd hostlink-controlplane`` in a subprocess (no tests of its own)."""

    def run_twistd(self, *args: str) -> subprocess.CompletedProcess[str]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        agents = os.path.join(directory, "agents.json")
        with open(agents, "w") as f:
            json.dump({"agent-1": public_key_base64(KEY)}, f)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        return subprocess.run(
            [twistd, "-n", "--pidfile=", "hostlink-controlplane", "--agents", agents, *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=directory,
        )

    def busy_port(self) -> int:
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port: int = holder.getsockname()[1]
        return port

    def assertOneLine(self, result: subprocess.CompletedProcess[str], expected: str) -> None:
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertNotIn("Traceback", output)
        errors = [line for line in output.splitlines() if "error]" in line or "Error" in line]
        self.assertEqual(len(errors), 1, output)
        self.assertIn(expected, errors[0])



class BusyPortTests(TwistdRun):
    """Issue 9 item 6: a busy port is one line naming it, not a traceback."""

    def test_busy_gateway_port(self) -> None:
        port = self.busy_port()
        result = self.run_twistd(
            "--listen", f"tcp:{port}:interface=127.0.0.1", "--operator-listen", "none"
        )
        self.assertOneLine(
            result,
            f"--listen tcp:{port}:interface=127.0.0.1: port {port} is already in use by "
            "another process: stop that process, or choose another port with --listen",
        )

    def test_busy_operator_port(self) -> None:
        port = self.busy_port()
        result = self.run_twistd(
            "--listen", "tcp:0:interface=127.0.0.1",
            "--operator-listen", f"tcp:{port}:interface=127.0.0.1",
        )
        self.assertOneLine(result, "choose another port with --operator-listen")


class ListenFailureTests(TwistdRun):
    """
    Every failure to listen is one line naming the option and the endpoint,
    not only CannotListenError (a new user's trial: tracebacks before).
    """

    def test_gateway_port_out_of_range(self) -> None:
        result = self.run_twistd("--listen", "tcp:99999", "--operator-listen", "none")
        self.assertOneLine(
            result,
            "hostlink-controlplane: --listen tcp:99999: port out of range "
            "(ports are 1-65535): choose another port with --listen",
        )

    def test_operator_port_out_of_range(self) -> None:
        result = self.run_twistd(
            "--listen", "tcp:0:interface=127.0.0.1", "--operator-listen", "tcp:99999"
        )
        self.assertOneLine(
            result,
            "--operator-listen tcp:99999: port out of range (ports are 1-65535): "
            "choose another port with --operator-listen",
        )

    def test_unix_socket_in_missing_directory(self) -> None:
        missing = os.path.abspath(self.mktemp())  # never created
        socket_path = os.path.join(missing, "sock")
        result = self.run_twistd("--listen", f"unix:{socket_path}", "--operator-listen", "none")
        self.assertOneLine(
            result,
            f"--listen unix:{socket_path}: directory {missing} does not exist: "
            "create it, or choose another path with --listen",
        )


class UnderTwistdTests(TwistdRun):
    """
    A usage error under twistd is the error and a pointer to ``--help``, not
    twistd's whole option list with the error at its end (a new user's trial).
    """

    def twistd(self, *args: str) -> subprocess.CompletedProcess[str]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        return subprocess.run(
            [twistd, "-n", "--pidfile=", "hostlink-controlplane", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=directory,
        )

    def assertTwoLines(self, result: subprocess.CompletedProcess[str], expected: str) -> None:
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertEqual(
            result.stderr.splitlines(),
            [
                f"twistd hostlink-controlplane: {expected}",
                "(twistd hostlink-controlplane --help lists every option)",
            ],
        )

    def test_usage_errors(self) -> None:
        good = os.path.abspath(self.mktemp())
        with open(good, "w") as f:
            json.dump({"agent-1": public_key_base64(KEY)}, f)
        bad_json = os.path.abspath(self.mktemp())
        with open(bad_json, "w") as f:
            f.write("{bad")
        placeholder = os.path.abspath(self.mktemp())
        with open(placeholder, "w") as f:
            json.dump({"AGENT_ID": "BASE64_PUBLIC_KEY"}, f)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        for args, expected in (
            ((), "--agents FILE is required (JSON: agent id -> public key)"),
            (("--agents", "/nonexistent.json"), "--agents: /nonexistent.json: cannot read"),
            (("--agents", bad_json), f"--agents: {bad_json}: not valid JSON"),
            (("--agents", placeholder), f"--agents: {placeholder}: agent 'AGENT_ID'"),
            (("--agents", good, "--max-skew", "5 min"), "--max-skew: "),
            (("--agents", good, "--database", "/nonexistent/x.db"), "--database: "),
            (("--agents", directory), f"--agents: {directory}: cannot read"),
            (("--agents", good, "--bogus"), "option --bogus not recognized"),
        ):
            with self.subTest(args=args):
                result = self.twistd(*args)
                lines = result.stderr.splitlines()
                self.assertTrue(lines and lines[0].startswith("twistd "), result.stderr)
                self.assertIn(expected, lines[0])
                self.assertTwoLines(result, lines[0].split(": ", 1)[1])

    def test_version_names_hostlink_tw(self) -> None:
        from twisted.copyright import version as twisted_version

        from hostlink_tw import __version__

        result = self.twistd("--version")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, f"hostlink_tw {__version__} (Twisted {twisted_version})\n")


class AloneTests(TestCase):
    """Used on its own (not under twistd), Options raises its usage errors."""

    def test_unknown_option_raises(self) -> None:
        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["--bogus"])
        self.assertIn("--bogus", str(error))
