"""``twistd hostlink``: plugin, options and service construction."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.config import SETTINGS
from hostlink_tw.service import HostlinkService
from hostlink_tw.tap import Options, makeService


def parse(args: list[str], environ: dict[str, str] | None = None) -> Options:
    options = Options(environ=environ or {})
    options.parseOptions(args)
    return options


class PluginTests(SynchronousTestCase):
    def test_plugin_is_discovered(self) -> None:
        import twisted.plugins

        makers = {m.tapname: m for m in getPlugins(IServiceMaker, twisted.plugins)}
        maker = makers["hostlink"]
        self.assertTrue(IPlugin.providedBy(maker))
        self.assertTrue(IServiceMaker.providedBy(maker))
        self.assertIs(maker.options, Options)

    def test_discovery_imports_nothing_heavy(self) -> None:
        """twistd imports every plugin module at startup: ours stays light."""
        code = (
            "import sys, twisted.plugins.hostlink_plugin as p;"
            "heavy = [m for m in sys.modules if m.startswith(('hostlink_tw', 'autobahn',"
            " 'cryptography', 'prometheus_client'))];"
            "print(sorted(heavy))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        self.assertEqual(out.strip(), "[]")


    def test_service_without_status_page_imports_no_web_stack(self) -> None:
        """The status page is off by default: its imports must not slow every start."""
        code = (
            "import sys; from hostlink_tw.config import Settings;"
            "from hostlink_tw.service import HostlinkService; HostlinkService(Settings());"
            "print(sorted(m for m in sys.modules"
            " if m.startswith(('prometheus_client', 'twisted.web.server', 'hostlink_tw.status'))))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        self.assertEqual(out.strip(), "[]")


class OptionsTests(SynchronousTestCase):
    def test_help_lists_every_setting_with_env_and_default(self) -> None:
        text = str(Options(environ={}))
        for spec in SETTINGS:
            self.assertIn(f"--{spec.option}", text)
            # usage wraps long help; compare without the line breaks
            flat = " ".join(text.split())
            self.assertIn(f"env {spec.env}", flat)
            self.assertIn(f"default {spec.default}", flat)

    def test_defaults_come_from_environment(self) -> None:
        options = parse([], {"HOSTLINK_WS_RECONNECT_MIN": "2s", "HOSTLINK_WS_ENABLED": "yes"})
        assert options.settings is not None
        self.assertEqual(options.settings.reconnect_min, 2.0)
        self.assertTrue(options.settings.enabled)

    def test_options_override_environment(self) -> None:
        options = parse(
            ["--reconnect-min", "3s", "--url", "ws://127.0.0.1:9/api/v1/agents/ws", "--enable"],
            {"HOSTLINK_WS_RECONNECT_MIN": "2s", "HOSTLINK_WS_URL": "wss://other.example/ws"},
        )
        assert options.settings is not None
        self.assertEqual(options.settings.reconnect_min, 3.0)
        self.assertEqual(options.settings.ws_url, "ws://127.0.0.1:9/api/v1/agents/ws")
        self.assertTrue(options.settings.enabled)

    def test_disabled_without_enable(self) -> None:
        options = parse([])
        assert options.settings is not None
        self.assertFalse(options.settings.enabled)

    def test_bad_values_are_one_line_usage_errors(self) -> None:
        for args in (
            ["--reconnect-min", "fast"],
            ["--ping-interval", "1s"],
            ["--max-message-bytes", "12"],
            ["--reconnect-jitter", "random"],
            ["--url", "http://x"],
            ["--ca-file", "/nonexistent/ca.pem"],
            ["--status-listen", "bogus:1"],
            ["--status-listen", "tcp:notaport"],
        ):
            with self.subTest(args=args):
                error = self.assertRaises(usage.UsageError, parse, args)
                message = str(error)
                self.assertNotIn("\n", message)
                self.assertIn(args[0], message)

    def test_twistd_reports_bad_option_without_traceback(self) -> None:
        code = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
        done = subprocess.run(
            [sys.executable, "-c", code, "-n", "--pidfile=", "hostlink", "--ping-interval", "1x"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # (twistd's exit status for a usage error is Twisted's: 1 on current
        # releases, 0 on some older ones; the message is what we own.)
        output = done.stdout + done.stderr
        self.assertNotIn("Traceback", output)
        errors = [
            line for line in output.splitlines() if "--ping-interval" in line and "1x" in line
        ]
        self.assertEqual(len(errors), 1, output)

    def test_bad_status_endpoint_from_environment_is_a_usage_error(self) -> None:
        error = self.assertRaises(
            usage.UsageError, parse, [], {"HOSTLINK_WS_STATUS_LISTEN": "nonsense:1"}
        )
        self.assertIn("HOSTLINK_WS_STATUS_LISTEN", str(error))

    def test_make_service(self) -> None:
        service = makeService(parse(["--enable", "--state-path", "/nonexistent"]))
        self.assertIsInstance(service, HostlinkService)
        assert isinstance(service, HostlinkService)
        self.assertEqual(service.settings.state_path, "/nonexistent")
        self.assertTrue(service.settings.enabled)

    def test_status_listen_adds_the_status_service(self) -> None:
        service = makeService(parse(["--status-listen", "tcp:0:interface=127.0.0.1"]))
        assert isinstance(service, HostlinkService)
        self.assertIsNotNone(service.getServiceNamed("status"))


class UnderTwistdTests(SynchronousTestCase):
    """What an operator sees when twistd runs the plugin."""

    def twistd(self, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        code = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
        return subprocess.run(
            [sys.executable, "-c", code, "-n", "--pidfile=", "hostlink", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )

    def test_bad_environment_value_is_one_line_and_a_pointer(self) -> None:
        """No 50-line option list in front of the one line that matters."""
        done = self.twistd([], {"HOSTLINK_WS_CA_FILE": "/nonexistent/ca.pem"})
        self.assertEqual(done.returncode, 1)
        self.assertEqual(done.stdout, "")
        lines = done.stderr.splitlines()
        self.assertEqual(len(lines), 2, done.stderr)
        self.assertIn("HOSTLINK_WS_CA_FILE", lines[0])
        self.assertIn("/nonexistent/ca.pem", lines[0])
        self.assertIn("--help", lines[1])

    def test_bad_option_value_is_one_line_and_a_pointer(self) -> None:
        done = self.twistd(["--reconnect-min", "fast"], {})
        self.assertEqual(done.returncode, 1)
        self.assertNotIn("--ping-interval", done.stdout + done.stderr)  # no option list
        self.assertEqual(len(done.stderr.splitlines()), 2, done.stderr)

    def test_unknown_option_is_one_line_and_a_pointer(self) -> None:
        """New-user trial: ``twistd hostlink --bogus`` printed the whole option list first."""
        done = self.twistd(["--bogus"], {})
        self.assertEqual(done.returncode, 1)
        self.assertNotIn("--ping-interval", done.stdout + done.stderr)
        lines = done.stderr.splitlines()
        self.assertEqual(len(lines), 2, done.stderr)
        self.assertIn("bogus", lines[0])

    def test_version_names_hostlink_tw(self) -> None:
        from twisted.copyright import version as twisted_version

        from hostlink_tw import __version__

        done = self.twistd(["--version"], {})
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, f"hostlink_tw {__version__} (Twisted {twisted_version})\n")


class TaskOptionsTests(SynchronousTestCase):
    """The phase-2 settings as options (PROTOCOL §10)."""

    def test_flags_and_values(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        options = parse(
            ["--enable-delivery", "--enable-results", "--task-timeout", "1h",
             "--task-queue-limit", "3", "--task-workdir", directory,
             "--local-store-path", "/srv/t.db", "--polling-fallback", "0s"],
            {"HOSTLINK_TASK_QUEUE_LIMIT": "9"},
        )
        settings = options.settings
        assert settings is not None
        self.assertEqual(
            (settings.delivery_enabled, settings.results_enabled, settings.task_timeout,
             settings.task_queue_limit, settings.task_workdir, settings.local_store_path,
             settings.polling_fallback_threshold),
            (True, True, 3600.0, 3, directory, "/srv/t.db", 0.0),
        )

    def test_flags_off_without_the_option(self) -> None:
        settings = parse([]).settings
        assert settings is not None
        self.assertEqual((settings.delivery_enabled, settings.results_enabled), (False, False))

    def test_bad_values_are_one_line_usage_errors(self) -> None:
        for args, environ in (
            (["--task-workdir", "/nonexistent/dir"], {}),
            ([], {"HOSTLINK_TASK_WORKDIR": "/nonexistent/dir"}),
            (["--task-concurrency", "0"], {}),
            (["--spool-cap-bytes", "1000"], {}),
            (["--store-retention", "1s"], {}),
        ):
            with self.subTest(args=args, environ=environ):
                error = self.assertRaises(usage.UsageError, parse, args, environ)
                self.assertNotIn("\n", str(error))
                self.assertIn(args[0] if args else "HOSTLINK_TASK_WORKDIR", str(error))

    def test_help_names_the_task_flags(self) -> None:
        text = " ".join(str(Options(environ={})).split())
        self.assertIn("--enable-delivery accept task.deliver over the session", text)
        self.assertIn("--enable-results send task output and finals over the session", text)


class FlagHelpTests(SynchronousTestCase):
    def test_enable_help_describes_the_flag_not_values(self) -> None:
        """--enable takes no value: its help says what it does."""
        text = " ".join(str(Options(environ={})).split())
        help_ = text.split("--enable", 1)[1].split("--", 1)[0]
        what = help_.split("[", 1)[0]
        self.assertIn("turn the WebSocket uplink on", what)
        for value_word in ("true", "yes", "1"):
            self.assertNotIn(value_word, what)
