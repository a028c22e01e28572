"""The HTTP API: ``create_app(settings=None)`` (gunicorn: ``api:create_app()``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from batchvision.core.settings import Settings

# Nothing heavy is imported here: gunicorn's master imports this package (for
# api.gunicorn_conf) before the gevent workers monkey-patch, and a Redis or SSL module imported
# that early would be left unpatched.


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app; ``settings`` default to the ``BATCHVISION_*`` environment."""
    from flask import Flask

    from api import (
        auth,
        docs,
        errors,
        health,
        inference,
        job_list,
        jobs,
        metrics,
        models,
        multipart,
        slow_clients,
        web,
    )
    from api.fastjson import OrjsonProvider
    from api.services import Services
    from api.uploads import ArchiveMemory, UploadRequest
    from batchvision.core.settings import Settings
    from batchvision.server.queue import uses_amqp
    from batchvision.server.routing import interactive_queue

    settings = settings or Settings.from_env()
    from batchvision.core.imaging import warm_up

    warm_up()  # Pillow's plugins, before the first upload rather than inside it
    app = Flask(__name__)
    app.json = OrjsonProvider(app)
    app.request_class = UploadRequest
    multipart.install()  # request.files without two patterns compiled per request
    # `/v1//jobs` is no route: a JSON 404, not an HTML redirect (before any key is checked).
    app.url_map.merge_slashes = False
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        MAX_FORM_PARTS=settings.max_files_per_request + errors.FORM_PARTS_SLACK,
        MAX_FORM_MEMORY_SIZE=1024 * 1024,
        JSON_SORT_KEYS=False,
    )
    svc = Services.create(settings)
    # Celery imports its result backend on the first publish (about 0.3 s of imports that
    # would block this worker's event loop inside the first request): do it now.
    _ = svc.celery.backend
    app.extensions["batchvision"] = svc
    ArchiveMemory(settings.archive_memory_bytes or settings.max_archive_bytes).init_app(app)
    errors.register(app)
    slow_clients.init_app(app, settings.api_body_timeout_s)
    metrics.init_app(
        app,
        svc.telemetry,
        (settings.queue, interactive_queue(settings)),
        models.queues_of(svc),
        amqp=settings if uses_amqp(settings) else None,
    )
    # -- tracing: a no-op unless the otel extra and an OTLP endpoint/trace file --
    from api import tracing as request_spans
    from batchvision.server import tracing

    tracing.setup("batchvision-api", settings)
    request_spans.init_app(app)
    auth.init_app(app, models.accepted_keys(settings), settings.allowed_hosts)  # admin keys are API keys too
    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(job_list.bp)  # GET /v1/jobs: the caller's jobs
    app.register_blueprint(models.bp)  # GET /v1/models, POST /v1/models/<name>/reload
    app.register_blueprint(web.bp)  # GET / (the page); its files are the app's /static
    app.register_blueprint(docs.bp)
    app.register_blueprint(inference.bp)  # /v2: the Open Inference Protocol
    return app
