"""One router per resource, gathered into ``api_router``."""

from fastapi import APIRouter

from ..schemas import ValidationErrorPublic, error_response
from . import audit, health, studies, worklist

_INVALID = {422: error_response("Invalid parameter or X-User header", ValidationErrorPublic)}

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(worklist.router, responses=_INVALID)
api_router.include_router(studies.router, responses=_INVALID)
api_router.include_router(audit.router, responses=_INVALID)
