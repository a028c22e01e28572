"""The web page: ``GET /`` serves ``api/static/index.html``; its CSS and JavaScript modules are
plain files served by Flask's static route (``/static/...``). No build step, no CDN: the page
talks to ``/v1`` on its own origin, and its Content-Security-Policy allows nothing else."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, request, send_from_directory
from flask.blueprints import BlueprintSetupState

from api.contract import undocumented

STATIC = Path(__file__).resolve().parent / "static"

# Same origin only; thumbnails are object URLs of the user's own files (blob:).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

bp = Blueprint("web", __name__)


@bp.get("/")
@undocumented
def index() -> Response:
    """The page (drop a folder, watch it classify, browse and download the results)."""
    resp = send_from_directory(STATIC, "index.html", max_age=0)
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "no-referrer"
    return resp


@bp.after_app_request
def _revalidate_assets(resp: Response) -> Response:
    """The page's files revalidate on every load (ETag), so a deploy never mixes old modules
    with new ones; they are small and a 304 costs one round trip."""
    if request.endpoint in ("static", "web.index"):
        resp.headers["Cache-Control"] = "no-cache"
        resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


@bp.record_once
def _check_static(state: BlueprintSetupState) -> None:
    """Fail at start, not at the first visit, if the app would not serve ``api/static`` at
    ``/static`` (an install without the package data)."""
    folder = state.app.static_folder
    if folder is None or Path(folder).resolve() != STATIC or not (STATIC / "index.html").is_file():
        raise RuntimeError(f"the web page's files are missing from {STATIC}")
