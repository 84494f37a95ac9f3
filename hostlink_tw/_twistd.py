"""
What the two twistd plugins (``twistd hostlink``, ``twistd
hostlink-controlplane``) share on their command line: ``--version`` names
hostlink_tw, and a usage error under twistd is two lines, not the whole
option list with the error at its end.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import ClassVar

from twisted.copyright import version as twisted_version
from twisted.python import usage

from hostlink_tw import __version__

__all__ = ["PluginOptions"]


class PluginOptions(usage.Options):
    """
    Options of a twistd plugin.  Used alone (tests, scripts), they raise
    :class:`usage.UsageError` as any :class:`usage.Options` does.
    """

    #: The twistd subcommand, as the user types it (``hostlink``).
    command: ClassVar[str] = ""
    #: What ``--help`` lists, for the pointer after an error (``option``).
    listed: ClassVar[str] = "option"
    #: The usage errors shown in two lines under twistd; others keep
    #: twistd's own report (the option list, then the error).
    short_errors: ClassVar[tuple[type[usage.UsageError], ...]] = (usage.UsageError,)

    def opt_version(self) -> None:
        """Print the versions of hostlink_tw and Twisted, and exit."""
        sys.stdout.write(f"hostlink_tw {__version__} (Twisted {twisted_version})\n")
        raise SystemExit(0)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Parse ``options``; under twistd, a usage error ends the process with
        one line and a pointer to ``--help``, where twistd would print the
        whole option list first.  Used alone, the error is raised.
        """
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except self.short_errors as e:
            if getattr(self, "parent", None) is None:  # not a twistd subcommand
                raise
            raise SystemExit(
                f"twistd {self.command}: {e}\n"
                f"(twistd {self.command} --help lists every {self.listed})"
            ) from None
