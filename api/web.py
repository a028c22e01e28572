"""The web page: ``GET /`` serves ``api/static/index.html``; its CSS and JavaScript modules are
plain files served by Flask's static route (``/static/...``); ``GET /auth`` tells the page whether
it needs an API key. No build step, no CDN: the page
talks to ``/v1`` on its own origin, and its Content-Security-Policy allows nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, Response, request, send_from_directory
from flask.blueprints import BlueprintSetupState

from api.auth import digest, parse_keys, presented_key
from api.contract import undocumented
from api.models import accepted_keys
from api.services import services

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


@bp.get("/auth")
@undocumented
def auth() -> dict[str, Any]:
    """Does this API want a key, and is the one sent (if any) accepted? Always ``200``: the page
    asks before its first request, and a browser logs every 4xx answer as a failed resource, so
    the answer is in the body. It tells no more than any ``/v1`` route's ``401`` would."""
    allowed = parse_keys(accepted_keys(services().settings))  # admin keys are API keys too
    if not allowed:
        return {"keys_required": False, "key_accepted": True, "reason": None}
    key = presented_key()
    if key is None:
        reason = {"code": "unauthorized", "message": "an API key is required"}
    elif digest(key) not in allowed:
        reason = {"code": "invalid_api_key", "message": "invalid API key"}
    else:
        return {"keys_required": True, "key_accepted": True, "reason": None}
    return {"keys_required": True, "key_accepted": False, "reason": reason}


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
