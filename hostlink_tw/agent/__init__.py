"""
The agent: its connection to the control plane and what runs over it.

* :mod:`hostlink_tw.agent.events` — what observers are told (typed events,
  end reasons).
* :mod:`hostlink_tw.agent.machine` — the connection's states, the legal
  transitions between them and the timers each state owns.
* :mod:`hostlink_tw.agent.keepalive` — our ping/pong deadline.
* :mod:`hostlink_tw.agent.connection` — the Autobahn protocol: a thin
  adapter that reports typed inputs to its owner.
* :mod:`hostlink_tw.agent.factory` — Twisted's ``ReconnectingClientFactory``,
  configured with our delays.
* :mod:`hostlink_tw.agent.session` — one active session: the message
  dispatch table and the waiters for acks.
* :mod:`hostlink_tw.agent.client` — :class:`HostlinkClient`, the owner of
  all of the above and what embedding code uses.
"""
