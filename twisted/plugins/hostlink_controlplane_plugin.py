"""twistd plugin: ``twistd hostlink-controlplane`` runs the reference control plane.

A lazy ServiceMaker: plugin discovery imports this on every twistd start, and
it must import nothing heavy.
"""

from twisted.application.service import ServiceMaker

hostlinkControlPlane = ServiceMaker(  # noqa: N816 - Twisted's plugin naming
    "hostlink-controlplane",
    "hostlink_tw.controlplane.tap",
    "Reference Hostlink control plane: the agent WebSocket gateway for tests, demos "
    "and local development.",
    "hostlink-controlplane",
)
