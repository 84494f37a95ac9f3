"""
The agent: its connection to the control plane and what runs over it.

* :mod:`~hostlink_tw.agent.client` — :class:`HostlinkClient`, what embedding
  code uses: start/stop, the state machine, events, the reconnect loop.
* :mod:`~hostlink_tw.agent.factory` — Twisted's ``ReconnectingClientFactory``,
  configured with our delays.
* :mod:`~hostlink_tw.agent.attempt` — one connection attempt: the owner its
  protocol reports to, its deadlines, the hello, inbound frames.
* :mod:`~hostlink_tw.agent.connection` — the Autobahn protocol: a thin
  adapter (TLS, proxy CONNECT, signing in ``onConnecting``, bounds).
* :mod:`~hostlink_tw.agent.session` — one active session: the dispatch
  table and the waiters for acks.
* :mod:`~hostlink_tw.agent.machine` — the connection's states, the legal
  transitions and the timers each state owns.
* :mod:`~hostlink_tw.agent.keepalive` — our ping/pong deadline.
* :mod:`~hostlink_tw.agent.events` — typed events and end reasons.
* :mod:`~hostlink_tw.agent.diagnosis` and :mod:`~hostlink_tw.agent.reporting`
  — why an attempt ended and what the operator reads about it.
* :mod:`~hostlink_tw.agent.interfaces` — the interfaces between these.
* :mod:`~hostlink_tw.agent.settings` — the settings the client reads.
* :mod:`~hostlink_tw.agent.identity` — loading the identity the agent runs
  on (``agent.json``, the private key), with the permission warnings.
"""
