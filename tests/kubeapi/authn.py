"""authentication.k8s.io/v1 TokenReview: which bearer tokens the emulated API server knows, and as whom.

Tests register tokens (`KubeAPI.service_account_token(namespace, name)` or `register_token`); a
TokenReview answers for them the way kube-apiserver does for ServiceAccount tokens: authenticated with
the user `system:serviceaccount:<ns>:<name>` and its groups, when the requested audiences (if any)
intersect the token's. Registered tokens also authenticate requests to the emulator itself.
"""

from __future__ import annotations

import secrets
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .store import ApiError

API_AUDIENCES = ("https://kubernetes.default.svc.cluster.local",)
TOKENREVIEW_PATH = ["apis", "authentication.k8s.io", "v1", "tokenreviews"]
DISCOVERY = {
    "name": "tokenreviews",
    "singularName": "tokenreview",
    "namespaced": False,
    "kind": "TokenReview",
    "verbs": ["create"],
}


@dataclass(frozen=True)
class Identity:
    username: str
    uid: str
    groups: tuple[str, ...]
    audiences: tuple[str, ...]


class Tokens:
    """Thread-safe: tests register from their thread, the server answers from its loop."""

    def __init__(self) -> None:
        self._known: dict[str, Identity] = {}
        self._lock = threading.Lock()

    def register(
        self, token: str, username: str, groups: Iterable[str] = (), audiences: Iterable[str] = API_AUDIENCES
    ) -> str:
        with self._lock:
            self._known[token] = Identity(username, str(uuid.uuid4()), tuple(groups), tuple(audiences))
        return token

    def service_account(self, namespace: str, name: str, audiences: Iterable[str] = API_AUDIENCES) -> str:
        groups = ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated")
        username = f"system:serviceaccount:{namespace}:{name}"
        return self.register(f"sa-{secrets.token_urlsafe(24)}", username, groups, audiences)

    def revoke(self, token: str) -> None:
        with self._lock:
            self._known.pop(token, None)

    def known(self, token: str) -> bool:
        with self._lock:
            return token in self._known

    def identity(self, token: str) -> Identity | None:
        with self._lock:
            return self._known.get(token)

    def review(self, body: Mapping) -> dict:
        """A TokenReview request body → the TokenReview the API server answers (201)."""
        if body.get("kind") != "TokenReview" or body.get("apiVersion") != "authentication.k8s.io/v1":
            raise ApiError(400, "BadRequest", "expected an authentication.k8s.io/v1 TokenReview")
        spec = body.get("spec") or {}
        token = spec.get("token")
        if not isinstance(token, str) or not token:
            raise ApiError(
                422, "Invalid", "TokenReview.authentication.k8s.io is invalid: spec.token: Required"
            )
        wanted = list(spec.get("audiences") or [])
        with self._lock:
            identity = self._known.get(token)
        status: dict = {"user": {}}
        if identity is None:
            status["error"] = "invalid bearer token"
        else:
            audiences = [a for a in wanted if a in identity.audiences] if wanted else list(identity.audiences)
            if wanted and not audiences:
                status["error"] = "token audiences do not match the requested audiences"
            else:
                status = {
                    "authenticated": True,
                    "user": {
                        "username": identity.username,
                        "uid": identity.uid,
                        "groups": list(identity.groups),
                    },
                    "audiences": audiences,
                }
        return {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
