"""The HTTP request's span (see :mod:`batchvision.server.tracing`); nothing when tracing is off.

The span is current while the request runs, so the ``enqueue`` spans of the job's messages are
its children. Scrapes and probes (``/metrics``, ``/healthz``, ``/readyz``) get no span.
"""

from __future__ import annotations

from flask import Flask, Response, g, request

from batchvision.server import tracing

UNTRACED = ("/metrics", "/healthz", "/readyz")


def init_app(app: Flask) -> None:
    if not tracing.enabled():
        return

    @app.before_request
    def _start() -> None:
        if request.path in UNTRACED:
            return
        route = request.url_rule.rule if request.url_rule else "unmatched"
        g.bv_span = tracing.start_request(request.method, route, request.path, request.headers)

    @app.after_request
    def _annotate(resp: Response) -> Response:
        handle = g.get("bv_span")
        if handle is None:
            return resp
        job_id = (request.view_args or {}).get("job_id")
        images = None
        if request.method == "POST" and resp.is_json and not resp.is_streamed:
            body = resp.get_json(silent=True)
            if isinstance(body, dict):
                job_id = body.get("job_id") or job_id
                accepted = body.get("accepted", body.get("total"))
                images = accepted if isinstance(accepted, int) else None
        tracing.annotate_request(handle, resp.status_code, job_id, images)
        return resp

    @app.teardown_request
    def _end(error: BaseException | None) -> None:
        tracing.end_request(g.pop("bv_span", None), error)
