"""
The soak's agent: ``twistd hostlink`` plus a probe of the reactor's timers.

Run by :mod:`evidence.soak` as ``twistd -n --python evidence/soak_app.py``.
The agent service is exactly what ``twistd hostlink`` builds
(:func:`hostlink_tw.tap.makeService` from :class:`hostlink_tw.tap.Options`,
parsed from the JSON list in ``HOSTLINK_SOAK_AGENT_ARGS``).  Next to it, on
the endpoint in ``HOSTLINK_SOAK_PROBE``, ``GET /timers`` answers what no
public interface of the agent exposes: the reactor's pending DelayedCalls
(how many, and which callables), and the number of objects the garbage
collector tracks.  The probe's own HTTP connections set no idle timer
(``timeout=None``), so they never show up in the count.

With ``HOSTLINK_SOAK_INJECT_LEAK`` set, every session that becomes active
leaks a file descriptor, a DelayedCall and 256 KiB on purpose: the soak's
``--inject-leak`` uses it to show that its verdict catches a leak.
"""

from __future__ import annotations

import gc
import json
import os
from collections import Counter
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Application, IService
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from hostlink_tw.tap import Options, makeService

AGENT_ARGS_ENV = "HOSTLINK_SOAK_AGENT_ARGS"
PROBE_ENV = "HOSTLINK_SOAK_PROBE"
LEAK_ENV = "HOSTLINK_SOAK_INJECT_LEAK"

#: The global reactor, untyped: twistd installs it before loading this file.
reactor: Any = _reactor

_leaked: list[Any] = []


def _leak(event: Any) -> None:
    """Leak on purpose, once per active session (the harness's own check)."""
    if event.kind == "active":
        _leaked.append(open(os.devnull, "rb"))  # noqa: SIM115 - the leak is the point
        _leaked.append(bytearray(256 * 1024))
        reactor.callLater(86400, _leaked.clear)


def _callable_name(call: Any) -> str:
    func = call.func
    name = getattr(func, "__qualname__", None) or type(func).__name__
    owner = getattr(func, "__self__", None)
    if owner is not None and not isinstance(owner, type):
        name = f"{type(owner).__name__}.{getattr(func, '__name__', name)}"
    return str(name)


def timers() -> dict[str, Any]:
    """The reactor's pending DelayedCalls and the collector's object count."""
    calls = [c for c in reactor.getDelayedCalls() if c.active()]
    return {
        "delayed_calls": len(calls),
        "by_callable": dict(Counter(_callable_name(c) for c in calls)),
        "gc_objects": len(gc.get_objects()),
    }


class TimersResource(Resource):
    """``GET /timers``: :func:`timers` as JSON."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        """The current timers."""
        request.setHeader(b"content-type", b"application/json")  # type: ignore[no-untyped-call]
        return json.dumps(timers(), sort_keys=True).encode() + b"\n"


def probe_service(endpoint: str) -> IService:
    """A web service on ``endpoint`` serving :class:`TimersResource` at ``/timers``."""
    root = Resource()  # type: ignore[no-untyped-call]
    timers_resource: Any = TimersResource()  # type: ignore[no-untyped-call]
    root.putChild(b"timers", timers_resource)
    site = Site(root, timeout=None)  # type: ignore[no-untyped-call]
    site.log = lambda request: None  # type: ignore[method-assign]
    service: Any = StreamServerEndpointService(  # type: ignore[no-untyped-call]
        serverFromString(reactor, endpoint), site  # type: ignore[no-untyped-call]
    )
    return service  # type: ignore[no-any-return]


def make_application(environ: Any = os.environ) -> Any:
    """The twistd application: the agent service and the probe."""
    options = Options(environ)
    options.parseOptions(json.loads(environ[AGENT_ARGS_ENV]))  # type: ignore[no-untyped-call]
    application = Application("hostlink-soak")  # type: ignore[no-untyped-call]
    agent: Any = makeService(options)
    agent.setServiceParent(application)
    if environ.get(LEAK_ENV):
        agent.add_observer(_leak)
    probe: Any = probe_service(environ[PROBE_ENV])
    probe.setServiceParent(application)
    return application


# twistd --python reads the module-level name "application".
if AGENT_ARGS_ENV in os.environ:
    application = make_application()
