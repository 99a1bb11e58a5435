"""What routes declare they need: the app context and the caller's tenant (authorised once)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.api.auth import tenant_of
from service.usecases.context import AppContext


def get_context(request: Request) -> AppContext:
    return request.app.state.ctx


Context = Annotated[AppContext, Depends(get_context)]
Tenant = Annotated[str, Depends(tenant_of)]
