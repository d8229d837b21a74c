"""OpenAI-style error answers: `APIError`, and FastAPI's validation errors turned into one."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# pydantic puts the member type of a union into an error's location ("prompt", "list[int]", 0);
# these are not field names and stay out of `param`.
_UNION_TAGS = {"str", "int", "float", "bool", "list[int]", "list[str]", "list[TextPart]", "dict[str,float]"}


def validation_error_to_api_error(errors: list[dict[str, Any]], content_type: str = "application/json") -> APIError:
    """The first of FastAPI's validation errors as an OpenAI-style 400 (OpenAI answers 400, not 422)."""
    if not errors:
        return APIError("invalid request")
    media = content_type.split(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        # FastAPI's own rule: the body was never read as JSON, whatever it holds.
        return APIError(f"send the request body as JSON with the header 'Content-Type: application/json' "
                        f"(got {content_type or 'none'!r})")
    err = errors[0]
    loc = [part for part in err.get("loc", ()) if part != "body" and str(part).replace(" ", "") not in _UNION_TAGS]
    param = ".".join(str(p) for p in loc) or None
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return APIError(f"the request body is not valid JSON ({detail})" if detail else "the request body is not valid JSON")
    if kind == "extra_forbidden":
        return APIError(f"unsupported parameter {param!r}: this server does not implement it", param=param,
                        code="unsupported_parameter")
    if kind == "missing":
        if param is None:
            return APIError("the request body is missing: send a JSON object")
        return APIError(f"missing required parameter {param!r}", param=param, code="missing_required_parameter")
    if param is None:
        return APIError(f"the request body must be a JSON object ({msg})")
    return APIError(f"{param}: {msg}", param=param, code="invalid_value")
