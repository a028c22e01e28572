"""``/docs``: Swagger UI over ``/openapi.json``, served from the ``swagger-ui-py`` wheel's files
(no CDN: the page works on a network without internet)."""

from __future__ import annotations

from pathlib import Path

import swagger_ui
from flask import Blueprint, Response, send_from_directory

from api.contract import undocumented

bp = Blueprint("docs", __name__)
STATIC = Path(swagger_ui.__file__).parent / "static"
ASSETS = {"swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "favicon-32x32.png"}

PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>batchvision API</title>
  <link rel="icon" href="/docs/static/favicon-32x32.png">
  <link rel="stylesheet" href="/docs/static/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/static/swagger-ui-bundle.js"></script>
  <script src="/docs/static/swagger-ui-standalone-preset.js"></script>
  <script src="/docs/static/init.js"></script>
</body>
</html>
"""

# Kept out of the HTML so a strict Content-Security-Policy (no inline scripts) still works.
INIT = """window.ui = SwaggerUIBundle({
  url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset.slice(1)],
  layout: "BaseLayout"
});
"""


@bp.get("/docs")
@undocumented
def page() -> Response:
    return Response(PAGE, mimetype="text/html")


@bp.get("/docs/static/<name>")
@undocumented
def asset(name: str) -> Response:
    if name == "init.js":
        return Response(INIT, mimetype="text/javascript")
    if name not in ASSETS:
        return Response("not found", status=404, mimetype="text/plain")
    return send_from_directory(STATIC, name, max_age=86400)
