"""
The agent's WebSocket client, under the import path it has always had.

The code lives in :mod:`hostlink_tw.agent` (one module per piece: events,
state machine, keepalive, connection, factory, session, client); every name
documented here keeps working.
"""

from hostlink_tw.agent.client import CLOSE_TIMEOUT, HostlinkClient, redact_url
from hostlink_tw.agent.connection import MAX_RESPONSE_HEAD_BYTES, HostlinkClientProtocol
from hostlink_tw.agent.events import ClientEvent, EndReason, Observers
from hostlink_tw.agent.factory import HostlinkClientFactory
from hostlink_tw.agent.machine import ClientState
from hostlink_tw.agent.session import FRAME_PREVIEW_CHARS, Session
from hostlink_tw.agent.settings import ClientSettings

__all__ = [
    "CLOSE_TIMEOUT",
    "FRAME_PREVIEW_CHARS",
    "ClientEvent",
    "ClientSettings",
    "ClientState",
    "EndReason",
    "HostlinkClient",
    "HostlinkClientFactory",
    "HostlinkClientProtocol",
    "MAX_RESPONSE_HEAD_BYTES",
    "Observers",
    "Session",
    "redact_url",
]
