"""The HTTP API: ``create_app(settings=None)`` (gunicorn: ``api:create_app()``)."""

from __future__ import annotations

from flask import Flask

from batchvision.settings import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app; ``settings`` default to the ``BATCHVISION_*`` environment."""
    from api import auth, errors, health, jobs, metrics
    from api.services import Services

    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        MAX_FORM_PARTS=settings.max_files_per_request + 16,
        MAX_FORM_MEMORY_SIZE=1024 * 1024,
        JSON_SORT_KEYS=False,
    )
    svc = Services.create(settings)
    app.extensions["batchvision"] = svc
    errors.register(app)
    metrics.init_app(app, svc.store, settings.queue)
    auth.init_app(app, settings.api_keys)
    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    return app
