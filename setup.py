"""Packaging for hostlink_tw, the Twisted agent uplink of a Hostlink control plane."""

import atexit
import re
import shutil
import tempfile

from setuptools import setup

# pip builds in the checkout, and setuptools would leave build/ and
# hostlink_tw.egg-info/ behind there (pypa/setuptools#3236, #4198): build in
# a scratch directory instead, removed when this build step ends.
_SCRATCH = tempfile.mkdtemp(prefix="hostlink_tw-build-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)


def _version() -> str:
    # Read, not imported: the build must not need the package's dependencies.
    with open("hostlink_tw/__init__.py", encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError("no __version__ in hostlink_tw/__init__.py")
    return match.group(1)


setup(
    name="hostlink_tw",
    version=_version(),
    description=(
        "Agent-side WebSocket uplink to a Hostlink control plane, "
        "on Twisted and Autobahn"
    ),
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    python_requires=">=3.10",
    # "twisted.plugins" ships our plugin files (no __init__.py there: the
    # directory belongs to Twisted's namespace of plugin modules).
    packages=[
        "hostlink_tw",
        "hostlink_tw.agent",
        "hostlink_tw.controlplane",
        "hostlink_tw.wire",
        "twisted.plugins",
    ],
    # Declaring the root as the package directory makes an editable install
    # ("pip install -e .") a plain .pth entry for the checkout, which twistd
    # needs: it finds plugins only in twisted/plugins/ directories of
    # sys.path entries, and setuptools' import-hook editable modes add none.
    package_dir={"": "."},
    package_data={"hostlink_tw": ["py.typed"]},
    # Installed as PREFIX/share/doc/hostlink-tw/, where the systemd unit's
    # Documentation= points (/opt/hostlink-tw in contrib/hostlink-tw.service).
    data_files=[("share/doc/hostlink-tw", ["README.rst", "docs/protocol.rst"])],
    install_requires=[
        "twisted[tls]>=24.7.0",
        "autobahn>=24.4.2",
        "txaio>=23.1.1",
        "cryptography>=42.0.0",
        "zope.interface>=6.0",
        "prometheus_client>=0.20.0",
    ],
    extras_require={
        "dev": [
            "hypothesis>=6.100",
            "ruff>=0.6",
            "mypy>=1.10",
            # mypy plugin that understands zope.interface, for typed reactors.
            "mypy-zope>=1.0.17",
        ],
        # Benchmarks only: plots for docs/performance.rst.
        "bench": ["matplotlib>=3.8"],
    },
    entry_points={
        "console_scripts": ["hostlink-tw = hostlink_tw.cli:main"],
    },
    options={
        "build": {"build_base": f"{_SCRATCH}/build"},
        "egg_info": {"egg_base": _SCRATCH},
    },
    license="MIT",
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
