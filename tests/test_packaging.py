"""
The distribution ships its twistd plugins: after ``pip install .`` and after
``pip install -e .`` into a fresh virtualenv, ``twistd --help`` lists them.
Neither leaves build output in the checkout, and the editable install needs
no deprecated setuptools mode.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw import __version__

ROOT = Path(__file__).resolve().parent.parent
# The files a build reads; copying them keeps build/ and *.egg-info out of
# the checkout the tests run from.
SOURCES = ("setup.py", "pyproject.toml", "README.rst", "docs", "hostlink_tw", "twisted")
UNIT = ROOT / "contrib" / "hostlink-tw.service"
# Where the unit expects the installation (python3 -m venv /opt/hostlink-tw).
UNIT_PREFIX = "file:///opt/hostlink-tw/"
# tapname -> the plugin module that provides it
PLUGINS = {
    "hostlink": "hostlink_plugin.py",
    "hostlink-controlplane": "hostlink_controlplane_plugin.py",
}

PRINT_PURELIB = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
LIST_PLUGINS = (
    "import sys; sys.argv = ['twistd', '--help'];"
    "from twisted.scripts.twistd import run; run()"
)


def _run(
    args: list[str], cwd: Path | None = None, tmpdir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    # trial's --jobs workers inherit a PYTHONPATH holding the checkout; the
    # scratch environments must see only what was installed into them.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    done = subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{args!r} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
        )
    return done


class PluginShippingTests(SynchronousTestCase):
    """Install the project into scratch virtualenvs and ask twistd."""

    def setUp(self) -> None:
        self.work = Path(self.mktemp()).resolve()
        self.source = self.work / "src"
        self.source.mkdir(parents=True)
        for name in SOURCES:
            origin = ROOT / name
            if origin.is_dir():
                shutil.copytree(
                    origin,
                    self.source / name,
                    ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"),
                )
            else:
                shutil.copy2(origin, self.source / name)
        # A stale cache in the source tree must not end up in what we ship.
        (self.source / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale")

    def _scratch_env(self, name: str) -> Path:
        """
        A virtualenv without pip whose dependencies come from the running
        interpreter's site-packages (so the test needs no package download).
        """
        target = self.work / name
        venv.create(target, with_pip=False)
        python = target / "bin" / "python"
        purelib = _run([str(python), "-c", PRINT_PURELIB]).stdout
        Path(purelib.strip(), "_hostlink_test_deps.pth").write_text(
            sysconfig.get_paths()["purelib"] + "\n"
        )
        return python

    def _pip(self, *args: str) -> str:
        """Run pip; its output (stdout and stderr), after checking it left no litter."""
        tmp = self.work / "tmp"
        tmp.mkdir(exist_ok=True)
        done = _run([sys.executable, "-m", "pip", *args], tmpdir=tmp)
        self.assertCheckoutClean()
        self.assertEqual(sorted(p.name for p in tmp.iterdir()), [])
        return done.stdout + done.stderr

    def _pip_install(self, python: Path, *spec: str) -> str:
        return self._pip(
            "--python", str(python), "install", "--quiet", "--no-deps",
            "--no-build-isolation", *spec,
        )

    def assertCheckoutClean(self) -> None:
        """No build/, no *.egg-info: only the sources the checkout had."""
        self.assertEqual(
            sorted(p.name for p in self.source.iterdir()), sorted(SOURCES)
        )

    def _listed_tapnames(self, python: Path) -> str:
        # Run from an unrelated directory, so the checkout is not on sys.path
        # by accident.
        return _run([str(python), "-c", LIST_PLUGINS], cwd=self.work).stdout

    def assertPluginsListed(self, listing: str) -> None:
        commands = listing.split("Commands:", 1)
        self.assertEqual(len(commands), 2, listing)
        # Each command starts a line indented by four spaces; its
        # description may wrap onto further, deeper indented lines.
        names = set(re.findall(r"^ {4}(\S+)", commands[1], re.MULTILINE))
        for tapname in PLUGINS:
            self.assertIn(tapname, names)

    def test_wheel_ships_plugins_without_cache(self) -> None:
        """
        The wheel holds the plugin modules under twisted/plugins/, no
        twisted/__init__.py or twisted/plugins/__init__.py of its own (they
        belong to Twisted), and no dropin.cache.
        """
        wheels = self.work / "wheels"
        self._pip(
            "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels),
            str(self.source),
        )
        # The distribution's version is the package's (setup.py reads it).
        (wheel,) = wheels.glob(f"hostlink_tw-{__version__}-*.whl")
        names = zipfile.ZipFile(wheel).namelist()
        for module in PLUGINS.values():
            self.assertIn(f"twisted/plugins/{module}", names)
        self.assertNotIn("twisted/plugins/dropin.cache", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertNotIn("twisted/__init__.py", names)

        python = self._scratch_env("installed")
        self._pip_install(python, str(wheel))
        self.assertPluginsListed(self._listed_tapnames(python))
        self.assertUnitDocumentationInstalled(python.parent.parent)

    def assertUnitDocumentationInstalled(self, prefix: Path) -> None:
        """Every Documentation= of the systemd unit is a file the install wrote."""
        documentation = [
            line.split("=", 1)[1].strip()
            for line in UNIT.read_text(encoding="utf-8").splitlines()
            if line.startswith("Documentation=")
        ]
        self.assertIn(f"{UNIT_PREFIX}share/doc/hostlink-tw/protocol.rst", documentation)
        for uri in documentation:
            self.assertTrue(uri.startswith(UNIT_PREFIX), uri)
            installed = prefix / uri[len(UNIT_PREFIX):]
            self.assertTrue(installed.is_file(), f"{uri}: nothing installed at {installed}")

    def test_installed_from_the_checkout(self) -> None:
        """``pip install .``: the plugins, and nothing left in the checkout."""
        python = self._scratch_env("from-checkout")
        self._pip_install(python, str(self.source))
        self.assertPluginsListed(self._listed_tapnames(python))

    def test_editable_install_finds_plugins(self) -> None:
        python = self._scratch_env("editable")
        output = self._pip_install(python, "-e", str(self.source))
        # setuptools' "compat" editable mode prints a deprecation banner.
        self.assertNotIn("editable", output.lower(), output)
        self.assertPluginsListed(self._listed_tapnames(python))

    def test_scratch_env_without_project_lists_no_plugin(self) -> None:
        """The check above can fail: without the project, no hostlink tap."""
        python = self._scratch_env("bare")
        listing = self._listed_tapnames(python)
        self.assertIn("Commands:", listing)
        self.assertNotIn("hostlink", listing)
