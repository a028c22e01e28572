"""The Python client library: HTTP calls and bulk folder uploads (imports only ``core``)."""

from batchvision.client.bulk import FolderUpload
from batchvision.client.errors import ApiError, NoImages
from batchvision.client.http import FINAL, Client
from batchvision.client.retry import RetryPolicy

__all__ = ["FINAL", "ApiError", "Client", "FolderUpload", "NoImages", "RetryPolicy"]
