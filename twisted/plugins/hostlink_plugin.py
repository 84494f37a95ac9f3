"""twistd plugin: ``twistd hostlink`` runs the agent uplink.

Kept to a lazy ServiceMaker so that plugin discovery (which imports every
plugin module whenever twistd starts) imports nothing heavy.
"""

from twisted.application.service import ServiceMaker

hostlink = ServiceMaker(
    "hostlink",
    "hostlink_tw.tap",
    "Keep this host's authenticated WebSocket session to its Hostlink control plane.",
    "hostlink",
)
