"""README.rst matches behaviour: the configuration table and the embedding example."""

from __future__ import annotations

import os
import re
from pathlib import Path

from twisted.application.service import IServiceCollection
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.config import SETTINGS
from hostlink_tw.service import HostlinkService

README = (Path(__file__).resolve().parent.parent / "README.rst").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"\n{title}\n{'-' * len(title)}\n")
    following = re.search(r"\n[^\n]+\n-{3,}\n", README[start + len(title) + 2 :])
    end = start + len(title) + 2 + following.start() if following else len(README)
    return README[start:end]


def _table_rows() -> dict[str, list[str]]:
    """The configuration list-table, as variable -> [meaning, default, range, option]."""
    rows: dict[str, list[str]] = {}
    table = _section("Configuration").split(".. list-table::", 1)[1]
    table = table[table.index("   * - ") :].split("\n\n", 1)[0]  # ends at a blank line
    for block in table.split("   * - ")[1:]:
        cells = [c.strip() for c in block.split("\n     - ")]
        if cells[0] != "variable":  # the header row
            rows[cells[0].strip("`")] = [" ".join(c.split()) for c in cells[1:5]]
    return rows


class ReadmeTests(SynchronousTestCase):
    def test_every_setting_is_in_the_configuration_table(self) -> None:
        rows = _table_rows()
        for spec in SETTINGS:
            with self.subTest(env=spec.env):
                self.assertIn(spec.env, rows)
                meaning, default, accepted, option = rows[spec.env]
                self.assertEqual(meaning, spec.meaning)
                self.assertEqual(default, spec.default)
                self.assertEqual(accepted, spec.range or "—")
                self.assertEqual(option, f"``--{spec.option}``")

    def test_table_has_no_stale_rows(self) -> None:
        self.assertEqual(set(_table_rows()) - {s.env for s in SETTINGS}, set())

    def test_embedding_example_runs(self) -> None:
        section = _section("Embedding in a Twisted application")
        code = section.split("::\n\n", 1)[1].split("\n\n``", 1)[0]
        source = "\n".join(line[4:] for line in code.splitlines())
        self.assertIn("HostlinkService", source)
        previous = os.environ.pop("HOSTLINK_WS_ENABLED", None)
        self.addCleanup(
            lambda: previous is not None and os.environ.__setitem__("HOSTLINK_WS_ENABLED", previous)
        )
        namespace: dict[str, object] = {}
        exec(compile(source, "README.rst", "exec"), namespace)  # noqa: S102 - our own README
        collection = IServiceCollection(namespace["application"])
        uplink = collection.getServiceNamed("hostlink")
        self.assertIsInstance(uplink, HostlinkService)
        # Disabled by default: starting it makes no connection and no timer.
        collection.startService()
        self.assertIsNone(uplink.client)
        self.successResultOf(collection.stopService())

    # -- a new user's trial of the README (round 2, item 7) --------------------------

    def test_make_test_certificates_example_binds(self) -> None:
        """Every make_test_certificates(...) shown passes its required arguments."""
        import inspect

        from hostlink_tw.testing import make_test_certificates

        calls = re.findall(r"make_test_certificates\(([^)]*)\)", README)
        self.assertTrue(calls)
        signature = inspect.signature(make_test_certificates)
        for arguments in calls:
            with self.subTest(arguments=arguments):
                positional = [a for a in arguments.split(",") if a.strip() and "=" not in a]
                signature.bind(*positional)

    def test_status_endpoint_that_cannot_listen(self) -> None:
        """Both places that say what stops the start also say what does not."""
        for title in ("Production use", "Configuration"):
            with self.subTest(section=title):
                text = " ".join(_section(title).split())
                self.assertIn("a busy port, a port out of range, a missing UNIX socket", text)
                self.assertIn("``status page not started: …``", text)

    def test_install_says_where_the_commands_are(self) -> None:
        text = " ".join(_section("Install").split())
        self.assertIn("/opt/hostlink-tw/bin/hostlink-tw", text)
        self.assertIn("PATH", text)

    def test_demo_directory_is_named(self) -> None:
        """hostlink-tw demo leaves its --dir default (holding a key) behind: the README says so."""
        from hostlink_tw.cli import _parser

        default = _parser().parse_args(["demo"]).dir
        self.assertIn(f"leaves a ``{default}/``", " ".join(README.split()))

    def test_version_line_wording(self) -> None:
        """twistd logs its own lines first: the version is on the agent's start-up line."""
        self.assertNotIn("first log line", README)
        self.assertIn("start-up line", " ".join(README.split()))

    def test_attempts_is_defined(self) -> None:
        text = " ".join(_section("Embedding in a Twisted application").split())
        self.assertIn(
            "``attempts`` (connection attempts since the last active session; "
            "0 while a session is active)",
            text,
        )
