"""Flask's JSON through orjson: the documents of every route are encoded (and request bodies
parsed) in native code instead of the standard library's encoder, which is a visible part of
what one small request costs the API. What orjson cannot encode falls back to Flask's own
provider, so the documents are the same either way (compact, keys in insertion order)."""

from __future__ import annotations

from typing import Any, cast

import orjson
from flask import Response
from flask.json.provider import DefaultJSONProvider

_OPTIONS = orjson.OPT_NON_STR_KEYS


class OrjsonProvider(DefaultJSONProvider):
    """:class:`~flask.json.provider.DefaultJSONProvider` with orjson underneath."""

    sort_keys = False

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        if kwargs:  # indent, sort_keys, a default of the caller's: the standard library's way
            return super().dumps(obj, **kwargs)
        return self._encode(obj).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        if kwargs:
            return super().loads(s, **kwargs)
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        if self._app.debug and self.compact is None or self.compact is False:
            return cast(Response, super().response(obj))  # indented, for people reading it
        return Response(self._encode(obj) + b"\n", mimetype=self.mimetype)

    def _encode(self, obj: Any) -> bytes:
        try:
            return orjson.dumps(obj, option=_OPTIONS)
        except TypeError:  # a type orjson does not know (Decimal, a set): Flask's encoder does
            return super().dumps(obj).encode()
