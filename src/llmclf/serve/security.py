"""Who may talk to `llmclf serve`: the Host header must name this server (so a web page on another
domain that re-points its DNS name at this machine, DNS rebinding, is refused), and with an API key
every endpoint but /health needs `Authorization: Bearer KEY`. Errors are JSON like every other one."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from typing import Any

from starlette.datastructures import Headers

from llmclf.serve.limits import ApiError

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
OPEN_PATHS = frozenset({"/health"})  # probes (load balancers, orchestrators) carry no key


def host_name(header: str) -> str:
    """The host of a Host header, without its port or IPv6 brackets, in lower case."""
    value = header.strip().lower()
    if value.startswith("["):  # [::1]:8000
        end = value.find("]")
        return value[1:end] if end > 0 else value
    name, colon, port = value.rpartition(":")
    if colon and ":" not in name and port.isdigit():
        value = name
    return value.rstrip(".")


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (localhost, 127.0.0.0/8, ::1)."""
    if host_name(host) == "localhost":
        return True
    try:
        return ipaddress.ip_address(host_name(host)).is_loopback
    except ValueError:
        return False


class HostPolicy:
    """The names this server answers to: localhost, 127.0.0.1, ::1, the address it listens on, the
    names given (`*` for any, `*.example.com` for its subdomains), and any IP address, which no web page
    on another domain can make a browser send."""

    def __init__(self, bound_host: str, allowed: Iterable[str] = ()) -> None:
        names = {*LOCAL_NAMES, *(host_name(a) for a in allowed if a != "*")}
        if bound_host not in WILDCARD_ADDRESSES:
            names.add(host_name(bound_host))
        self.names = frozenset(names)
        self.any = "*" in allowed
        self.suffixes = tuple(name[1:] for name in self.names if name.startswith("*."))

    def allows(self, header: str) -> bool:
        name = host_name(header)
        if self.any or name in self.names or is_ip_address(name):
            return True
        return bool(name and self.suffixes and name.endswith(self.suffixes))


class Guard:
    """ASGI middleware in front of the app: 400 `invalid_host` for a Host header this server does not
    answer to, then, with an API key, 401 `unauthorized` for a request without it (except OPEN_PATHS)."""

    def __init__(self, app: Any, *, hosts: HostPolicy, api_key: str | None) -> None:
        self.app = app
        self.hosts = hosts
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        error = self.refusal(headers, scope["path"])
        if error is not None:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, headers: Headers, path: str) -> ApiError | None:
        host = headers.get("host")
        # No Host header at all (HTTP/1.0 probes) cannot come from a browser, so cannot be rebinding.
        if host is not None and not self.hosts.allows(host):
            return ApiError(
                400,
                "invalid_host",
                f"This server does not answer to the host name {host[:100]!r}. Address it by a name it "
                "serves (localhost, its IP address), or start it with --allowed-hosts naming this one.",
                close=True,
            )
        if self.api_key is None or path in OPEN_PATHS:
            return None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        # compare_digest takes the same time wherever the first difference is, so timing tells nothing.
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), self.api_key):
            return None
        found = "no Authorization header" if "authorization" not in headers else "a key that does not match"
        return ApiError(
            401,
            "unauthorized",
            f"This server needs an API key; the request had {found}. Send the header "
            "`Authorization: Bearer KEY` with the key the server was started with (--api-key or "
            "LLMCLF_API_KEY).",
            headers={"WWW-Authenticate": "Bearer"},
        )
