"""
``contrib/hostlink-tw.service``: every hardening setting is proven
compatible with a real ``wss://`` session by running the agent, exactly as
the unit's ``ExecStart=`` starts it, under the kernel restrictions those
settings stand for (see :mod:`tests.sandbox`).
"""

from __future__ import annotations

import configparser
import grp
import json
import os
import pwd
import shlex
import signal
import subprocess
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hostlink_tw.controlplane import start_control_plane
from hostlink_tw.identity import AgentState, generate_private_key, write_agent_state
from hostlink_tw.testing import make_test_certificates
from tests import sandbox
from tests.process_support import Collect

HERE = os.path.dirname(os.path.abspath(__file__))
UNIT = os.path.join(os.path.dirname(HERE), "contrib", "hostlink-tw.service")
SANDBOX = os.path.join(HERE, "sandbox.py")
WAIT = 30.0
AGENT = "agent-unit"

# [Service] settings that say how to run the service, not what it may do.
OPERATIONAL = {
    "Type",
    "ExecStart",
    "EnvironmentFile",
    "KillSignal",
    "KillMode",
    "SuccessExitStatus",
    "TimeoutStopSec",
    "Restart",
    "RestartSec",
    "StateDirectory",
    "StateDirectoryMode",
}
# Settings tests.sandbox knows how to apply.
EMULATED = {
    "User",
    "Group",
    "UMask",
    "NoNewPrivileges",
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectControlGroups",
    "RestrictAddressFamilies",
    "LockPersonality",
    "MemoryDenyWriteExecute",
}


def unit_service_settings(path: str = UNIT) -> dict[str, str]:
    """The ``[Service]`` section of the unit as a dict (the last value of a key wins)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    with open(path, encoding="utf-8") as f:
        parser.read_file(f)
    return dict(parser["Service"])


class UnitFileTests(SynchronousTestCase):
    def test_every_setting_is_operational_or_proven(self) -> None:
        """A new hardening setting needs a mechanism in tests.sandbox before it ships."""
        unknown = set(unit_service_settings()) - OPERATIONAL - EMULATED
        self.assertEqual(unknown, set(), "add each to tests/sandbox.py or leave it out")

    def test_no_write_execute_ban(self) -> None:
        """MemoryDenyWriteExecute=yes kills every wss:// attempt (see the unit's comment)."""
        self.assertNotIn("MemoryDenyWriteExecute", unit_service_settings())


_TLS_CONTEXT = """
import sys
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from hostlink_tw.tls import client_tls_options
creator = client_tls_options("127.0.0.1", None)
tls = TLSMemoryBIOProtocol(TLSMemoryBIOFactory(creator, True, None), None)
try:
    creator.clientConnectionForTLS(tls)
except MemoryError as e:
    print("MemoryError:", e)
    sys.exit(3)
print("context ok")
"""


class WriteExecuteTests(SynchronousTestCase):
    def test_tls_context_needs_write_execute_memory(self) -> None:
        """
        Why the unit has no MemoryDenyWriteExecute: pyOpenSSL makes cffi
        callbacks, which need W+X memory, for every TLS context.  If this
        fails, the installed pyOpenSSL no longer does, and the setting can
        come back (with the session test below proving it).
        """
        if not sandbox.mdwe_supported():
            raise self.skipTest("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
        spec = self.mktemp()
        with open(spec, "w", encoding="utf-8") as f:
            json.dump({"MemoryDenyWriteExecute": "yes"}, f)
        result = subprocess.run(  # noqa: S603 - our own interpreter and files
            [sys.executable, SANDBOX, spec, "--", sys.executable, "-c", _TLS_CONTEXT],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertIn("applied MemoryDenyWriteExecute", result.stdout, result.stderr)
        self.assertEqual(result.returncode, 3, result.stdout + result.stderr)
        self.assertIn("write+execute memory", result.stdout)


class HardenedUnitTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        if not sys.platform.startswith("linux") or os.geteuid() != 0:
            raise self.skipTest(
                "needs Linux and root: a mount namespace, seccomp and setuid stand in for systemd"
            )
        self.settings = unit_service_settings()
        if self.settings.get("MemoryDenyWriteExecute") == "yes" and not sandbox.mdwe_supported():
            raise self.skipTest("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
        # The unit's User=hostlink stands for an unprivileged system user.
        self.user = pwd.getpwnam("nobody")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        # trial makes some of its temporary directories 0700: let the
        # unprivileged user reach the CA file and the state directory.
        path = self.dir
        while path.startswith(os.getcwd() + os.sep):
            os.chmod(path, 0o755)
            path = os.path.dirname(path)
        self.state = os.path.join(self.dir, "state")
        key = generate_private_key(os.path.join(self.state, "agent.key"))
        write_agent_state(self.state, AgentState(agent_id=AGENT))
        mode = int(self.settings.get("StateDirectoryMode", "0755"), 8)
        os.chmod(self.state, mode)
        for path in [self.state, *(os.path.join(self.state, n) for n in os.listdir(self.state))]:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.public_key = key.public_key()
        self.certs = make_test_certificates(os.path.join(self.dir, "tls"))

    def spec(self) -> dict[str, str]:
        spec = {k: v for k, v in self.settings.items() if k in EMULATED}
        if "User" in spec:
            spec["User"] = self.user.pw_name
        if "Group" in spec:
            spec["Group"] = grp.getgrgid(self.user.pw_gid).gr_name
        spec["state_directory"] = self.state
        # Production installs into /opt; here the interpreter may be a
        # pyenv build under /root, and the checkout (with the venv, the CA
        # file and the state directory) under /root or /tmp, which
        # ProtectHome and PrivateTmp would hide: they stay visible, read-only.
        hidden = ("/home/", "/root/", "/run/user/", "/tmp/", "/var/tmp/")  # noqa: S108
        checkout = os.path.realpath(os.path.dirname(HERE))
        exposed = [p for p in (os.path.realpath(sys.base_prefix), checkout)
                   if p.startswith(hidden)]
        if exposed:
            spec["expose"] = " ".join(exposed)
        return spec

    def exec_start(self) -> list[str]:
        """The unit's ExecStart=, with this environment's twistd."""
        argv = shlex.split(self.settings["ExecStart"])
        self.assertEqual(os.path.basename(argv[0]), "twistd")
        return [os.path.join(os.path.dirname(sys.executable), "twistd"), *argv[1:]]

    @inlineCallbacks
    def test_wss_session_under_every_hardening_setting(self) -> Any:
        cp = yield start_control_plane({AGENT: self.public_key}, listen=self.certs.listen())
        self.addCleanup(cp.stop)
        self.assertTrue(cp.ws_url.startswith("wss://"))
        spec_path = os.path.join(self.dir, "spec.json")
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(self.spec(), f)
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOSTLINK_WS_ENABLED": "true",
            "HOSTLINK_WS_URL": cp.ws_url,
            "HOSTLINK_WS_CA_FILE": self.certs.ca,
            "HOSTLINK_STATE_PATH": self.state,
            "HOSTLINK_PRIVATE_KEY_PATH": os.path.join(self.state, "agent.key"),
        }
        proto = Collect()
        args = [sys.executable, SANDBOX, spec_path, "--", *self.exec_start()]
        process = reactor.spawnProcess(proto, sys.executable, args, env=env, path="/")

        def reap() -> Deferred[Any]:
            if process.pid is not None:  # only if the test failed first
                process.signalProcess("KILL")
            return proto.ended

        self.addCleanup(reap)
        active = cp.wait_active(AGENT, timeout=WAIT)
        try:
            session = yield active
        except defer.TimeoutError:
            self.fail(proto.output.decode(errors="replace"))
        closed = session.when_closed()
        process.signalProcess("TERM")
        yield closed
        reason = yield proto.ended
        log = proto.output.decode(errors="replace")
        applied = set(log.split("sandbox: applied ", 1)[1].split("\n", 1)[0].split(","))
        self.assertEqual(applied, set(self.spec()) - {"state_directory", "expose"}, log)
        if isinstance(reason, ProcessTerminated):
            self.assertEqual(reason.signal, signal.SIGTERM, log)
        else:
            self.assertIsInstance(reason, ProcessDone)
        self.assertNotIn("Traceback", log)
        self.assertNotIn("MemoryError", log)
