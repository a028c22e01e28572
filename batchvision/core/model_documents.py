"""The documents of the model routes: ``GET /v1/models`` and
``POST /v1/models/{name}/reload``. Pure pydantic, like :mod:`batchvision.core.documents`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from batchvision.core.documents import Document, whole_number


class ModelVersion(Document):
    """One version of a model, as the workers found it."""

    version: int = Field(ge=1)
    status: Literal["found", "ready", "failed"] = Field(
        description="found: on disk, not loaded yet; ready: loaded and checked; failed: refused (see error)"
    )
    error: str | None = Field(None, description="why the version was refused")
    replacement_error: str | None = Field(
        None,
        description="a ready version whose files were replaced by ones the workers refused (why): "
        "the files it was loaded from stay live until its files change again",
    )
    input_size: list[int] | None = Field(None, description="[width, height]")
    classes: int | None = None
    load_s: float | None = Field(None, description="seconds to load, warm up and check it")


class ModelInfo(Document):
    """A model: its versions, the live one, and the workers serving it."""

    name: str
    default: bool = Field(description="jobs that name no model get this one")
    live_version: int | None = Field(description="the version the workers switched to last")
    pinned_live_version: int | None = Field(
        None, description="the live version an operator chose (rollback); null: the newest that loads"
    )
    input_size: list[int] | None = Field(None, description="[width, height] of the live version")
    classes: int | None = Field(None, description="number of classes of the live version")
    labels: list[str] | None = Field(None, description="the live version's labels")
    versions: list[ModelVersion]
    workers: int = Field(ge=0, description="workers serving the model now (heartbeat within 30 s)")
    workers_by_version: dict[str, int] = Field(description="those workers by the version they have live")
    updated_at: float | None = Field(None, description="Unix time")


class ModelList(Document):
    """``GET /v1/models``."""

    default: str
    models: list[ModelInfo]


class ReloadRequest(BaseModel):
    """``POST /v1/models/{name}/reload`` body (optional): which version is to be live."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # (The constraints before the validator, so the schema keeps them as minimum and maximum.)
    version: (
        Annotated[int, Field(ge=1, le=999_999_999), BeforeValidator(whole_number)] | Literal["latest"] | None
    ) = Field(
        None,
        description="a version number: make it live (and keep it live: a rollback); `latest`: "
        "the newest version that loads, again; omitted: look for new versions, keep any choice",
    )


class ModelForgotten(Document):
    """``DELETE /v1/models/{name}``: the model is gone from the registry."""

    model: str
    forgotten: bool = True


class ReloadAccepted(Document):
    """``202`` of a reload request: the workers load in the background (``GET /v1/models``
    shows the outcome, a refused version with its reason)."""

    model: str
    request_id: str
    version: int | None = Field(None, description="the version made live, if one was named")
    latest: bool
    workers: int = Field(ge=0, description="workers that received the request")
    warning: str | None = Field(
        None,
        description="the named version was refused when last tried (and why): the workers try it "
        "again, and the live version stays until it loads",
    )
