"""What routes declare they need: the app context, the caller's tenant (authorised once) and the
shared query parameters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from service import schemas
from service.api.auth import tenant_of
from service.usecases.context import AppContext


def get_context(request: Request) -> AppContext:
    return request.app.state.ctx


Context = Annotated[AppContext, Depends(get_context)]
Tenant = Annotated[str, Depends(tenant_of)]
# The page cursor of every paged route: opaque, bounded, in its declared alphabet.
PageCursor = Annotated[str | None, Query(max_length=4096, pattern=schemas.CURSOR_PATTERN)]
