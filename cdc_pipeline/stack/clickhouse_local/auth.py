"""The one user the endpoint accepts, and the credentials a request carries."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from cdc_pipeline.stack.clickhouse_local.errors import ClickHouseError


@dataclass(frozen=True)
class Credentials:
    """The one user the endpoint accepts, with its password."""

    user: str = "default"
    password: str | None = None

    def check(self, headers: Mapping[str, str], params: Mapping[str, str]) -> None:
        """Raise AUTHENTICATION_FAILED unless the request carries the configured credentials."""
        if not self.password:
            raise ClickHouseError(516, "AUTHENTICATION_FAILED", "No password is configured: every request is refused")
        user, password = _request_credentials(headers, params)
        user_ok = hmac.compare_digest(user.encode(), self.user.encode())
        password_ok = hmac.compare_digest(password.encode(), self.password.encode())
        if not (user_ok and password_ok):
            raise ClickHouseError(
                516,
                "AUTHENTICATION_FAILED",
                f"{user}: Authentication failed: password is incorrect, or there is no user with such name.",
            )


def _request_credentials(headers: Mapping[str, str], params: Mapping[str, str]) -> tuple[str, str]:
    """User and password from X-ClickHouse-* headers, else Basic auth, else URL parameters."""
    if headers.get("X-ClickHouse-User") is not None or headers.get("X-ClickHouse-Key") is not None:
        return headers.get("X-ClickHouse-User") or "default", headers.get("X-ClickHouse-Key") or ""
    authorization = headers.get("Authorization") or ""
    if authorization[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ClickHouseError(516, "AUTHENTICATION_FAILED", "Malformed Basic authorization header") from exc
        user, _, password = decoded.partition(":")
        return user or "default", password
    return params.get("user") or "default", params.get("password", "")
