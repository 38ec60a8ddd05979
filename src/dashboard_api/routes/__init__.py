"""One router per resource, gathered into ``api_router``. Every router but ``health`` requires credentials."""

from fastapi import APIRouter, status

from ..schemas import ErrorPublic, ValidationErrorPublic, error_response
from . import audit, dicomweb, exports, health, me, studies, users, worklist

_INVALID = {422: error_response("Invalid parameter", ValidationErrorPublic)}
_AUTH = {
    status.HTTP_401_UNAUTHORIZED: error_response("No credentials, or an unknown, revoked, expired or invalid one", ErrorPublic),
    status.HTTP_403_FORBIDDEN: error_response("The caller's role may not do this", ErrorPublic),
    status.HTTP_503_SERVICE_UNAVAILABLE: error_response("The identity provider's keys cannot be fetched", ErrorPublic),
}

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(me.router, responses=_AUTH)
api_router.include_router(worklist.router, responses={**_AUTH, **_INVALID})
api_router.include_router(studies.router, responses={**_AUTH, **_INVALID})
api_router.include_router(dicomweb.router, responses={**_AUTH, **_INVALID})
api_router.include_router(audit.router, responses={**_AUTH, **_INVALID})
api_router.include_router(users.router, responses={**_AUTH, **_INVALID})
api_router.include_router(exports.router, responses={**_AUTH, **_INVALID})
