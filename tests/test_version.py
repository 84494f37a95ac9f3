"""One version, everywhere a user looks for it."""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stdout
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw import __version__
from hostlink_tw.config import Settings
from hostlink_tw.service import HostlinkService
from hostlink_tw.tap import Options


class VersionTests(SynchronousTestCase):
    def test_command_version(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "hostlink_tw", "--version"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual((done.returncode, done.stdout), (0, f"hostlink-tw {__version__}\n"))

    def test_twistd_hostlink_version(self) -> None:
        out = io.StringIO()
        with redirect_stdout(out):
            exit_ = self.assertRaises(SystemExit, Options(environ={}).parseOptions, ["--version"])
        self.assertEqual(exit_.code, 0)
        self.assertIn(f"hostlink_tw {__version__} (Twisted ", out.getvalue())

    def test_twistd_hostlink_help_names_version(self) -> None:
        self.assertIn(f"hostlink_tw {__version__}", " ".join(str(Options(environ={})).split()))

    def test_start_up_log_line(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = HostlinkService(Settings(), reactor=MemoryReactorClock())
        service.startService()
        self.addCleanup(service.stopService)
        versions = [e.get("version") for e in events if "version" in e]
        self.assertEqual(versions, [__version__], events)
