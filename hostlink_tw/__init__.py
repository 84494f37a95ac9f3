"""hostlink_tw: the agent-side WebSocket uplink of a Hostlink control plane.

One authenticated, live WebSocket session per agent, kept up through outages
and hostile input, built on Twisted and Autobahn and wire-compatible with the
reference Go agent.
"""

__version__ = "0.1.0"
