"""API keys: stored as SHA-256 digests, compared in constant time, never logged."""

import hashlib
import hmac

from fastapi import Request

from gateway.errors import Unauthorized


class KeyRing:
    def __init__(self, keys: list[str]) -> None:
        self._digests = [(f"key-{i}", _digest(key)) for i, key in enumerate(keys)]

    @property
    def is_open(self) -> bool:
        return not self._digests

    def principal(self, presented: str) -> str | None:
        """The name of the matching key, or None. Looks at every key, whatever matches."""
        digest = _digest(presented)
        found = None
        for name, stored in self._digests:
            if hmac.compare_digest(digest, stored):
                found = name
        return found

    def authenticate(self, request: Request, what: str = "API key") -> str:
        """The caller's key name, from `Authorization: Bearer KEY`; raises Unauthorized."""
        if self.is_open:
            return "anonymous"
        token = bearer_token(request)
        if token is None:
            raise Unauthorized(f"missing {what}: send `Authorization: Bearer <key>`")
        name = self.principal(token)
        if name is None:
            raise Unauthorized(f"invalid {what}")
        return name


def bearer_token(request: Request) -> str | None:
    """The token of `Authorization: Bearer TOKEN`, or None when there is none."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token.strip()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
