"""
The distribution ships its twistd plugins: after ``pip install .`` and after
``pip install -e .`` into a fresh virtualenv, ``twistd --help`` lists them.
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

ROOT = Path(__file__).resolve().parent.parent
# The files a build reads; copying them keeps build/ and *.egg-info out of
# the checkout the tests run from.
SOURCES = ("setup.py", "setup.cfg", "pyproject.toml", "README.rst", "hostlink_tw", "twisted")
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


def _run(args: list[str], cwd: Path | None = None) -> str:
    # trial's --jobs workers inherit a PYTHONPATH holding the checkout; the
    # scratch environments must see only what was installed into them.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
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
    return done.stdout


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
        purelib = _run([str(python), "-c", PRINT_PURELIB])
        Path(purelib.strip(), "_hostlink_test_deps.pth").write_text(
            sysconfig.get_paths()["purelib"] + "\n"
        )
        return python

    def _pip_install(self, python: Path, *spec: str) -> None:
        _run([
            sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
            "--no-deps", "--no-build-isolation", *spec,
        ])

    def _listed_tapnames(self, python: Path) -> str:
        # Run from an unrelated directory, so the checkout is not on sys.path
        # by accident.
        return _run([str(python), "-c", LIST_PLUGINS], cwd=self.work)

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
        _run([
            sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
            "--no-build-isolation", "-w", str(wheels), str(self.source),
        ])
        (wheel,) = wheels.glob("hostlink_tw-*.whl")
        names = zipfile.ZipFile(wheel).namelist()
        for module in PLUGINS.values():
            self.assertIn(f"twisted/plugins/{module}", names)
        self.assertNotIn("twisted/plugins/dropin.cache", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertNotIn("twisted/__init__.py", names)

        python = self._scratch_env("installed")
        self._pip_install(python, str(wheel))
        self.assertPluginsListed(self._listed_tapnames(python))

    def test_editable_install_finds_plugins(self) -> None:
        python = self._scratch_env("editable")
        self._pip_install(python, "-e", str(self.source))
        self.assertPluginsListed(self._listed_tapnames(python))

    def test_scratch_env_without_project_lists_no_plugin(self) -> None:
        """The check above can fail: without the project, no hostlink tap."""
        python = self._scratch_env("bare")
        listing = self._listed_tapnames(python)
        self.assertIn("Commands:", listing)
        self.assertNotIn("hostlink", listing)
