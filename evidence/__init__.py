"""
The evidence behind docs/chaos.rst, docs/soak.rst and docs/security.rst:
real agent and control plane processes on 127.0.0.1 under faults
(``make chaos``), over time (``make soak``), and under attack
(``python -m evidence.ping_flood``).  ``evidence.faults`` is the shared
harness: processes, ports, log capture, reaping.  Benchmarks live in
``benchmarks/`` (``make bench``).
"""
