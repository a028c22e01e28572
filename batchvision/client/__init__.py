"""The Python client library: HTTP calls and bulk folder uploads (imports only ``core``)."""

from batchvision.client.errors import ApiError
from batchvision.client.http import FINAL, Client

__all__ = ["FINAL", "ApiError", "Client"]
