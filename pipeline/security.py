"""Refusing dangerous inputs and keeping secrets out of outputs.

* ``address_guard``: while active, name resolution in this process refuses private, loopback,
  link-local, reserved and multicast addresses (unless allowed). Every connection yt-dlp opens
  (redirects included) resolves through ``socket.getaddrinfo``, so a redirect to 127.0.0.1 or to
  a cloud metadata address is refused before any byte is sent there. The guard covers this
  process only: programs it starts resolve names on their own. The download stage therefore runs
  yt-dlp in a child process that refuses its external downloaders (ffmpeg, aria2c, curl, ...)
  and rtmpdump, and limits ffmpeg post-processing to local files (stages/_ytdlp_worker.py).
* ``redact_url`` / ``redact_text``: credentials in URLs (``user:pass@``, signed-URL and token
  query parameters) never reach logs, errors, stats, shards or the report.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

BLOCKED_MARK = "blocked address"
_SENSITIVE_PARAMS = re.compile(
    r"^(x-amz-(signature|credential|security-token)|signature|sig|token|access_token|auth|key|api_?key|"
    r"password|secret|credential|x-goog-(signature|credential))$",
    re.IGNORECASE,
)
_URL_RE = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_BEARER_RE = re.compile(r"(?i)\b(bearer|token|api[_-]?key)([\s:=]+)([A-Za-z0-9._~+/-]{8,})")
_lock = threading.Lock()


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address leads to: IPv4-mapped, 6to4, Teredo, NAT64."""
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if any(ip in net for net in _NAT64):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_blocked_ip(address: str) -> bool:
    """True for every address that is not globally routable: private, loopback, link-local,
    shared (CGNAT 100.64/10), documentation, benchmarking, reserved, unspecified, multicast, and
    IPv6 addresses that embed such an IPv4 address (mapped, 6to4, Teredo, NAT64)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if any(is_blocked_ip(str(v4)) for v4 in embedded):
            return True
        if ip.ipv4_mapped is not None:
            return False  # the mapped IPv4 address is global
    return bool(not ip.is_global or ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_unspecified)


def _allowed(host: str, address: str, allowed_hosts: list[str]) -> bool:
    for entry in allowed_hosts:
        if entry == host:
            return True
        try:
            if ipaddress.ip_address(address.split("%")[0]) in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def check_host(host: str, allowed_hosts: list[str] | None = None) -> None:
    """Raise PermissionError if ``host`` resolves only to blocked addresses."""
    infos = socket.getaddrinfo(host, None)
    ok = [i for i in infos if not is_blocked_ip(str(i[4][0])) or _allowed(host, str(i[4][0]), allowed_hosts or [])]
    if not ok:
        raise PermissionError(f"{BLOCKED_MARK}: {host} resolves to a private, loopback or link-local address")


@contextmanager
def address_guard(allow_private: bool, allowed_hosts: list[str] | None = None) -> Iterator[None]:
    """Refuse connections to blocked addresses from this process while active."""
    if allow_private:
        yield
        return
    allowed = list(allowed_hosts or [])
    with _lock:
        original = socket.getaddrinfo

        def guarded(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            infos = original(host, port, *args, **kwargs)
            ok = [i for i in infos if not is_blocked_ip(str(i[4][0])) or _allowed(str(host), str(i[4][0]), allowed)]
            if not ok:
                raise OSError(f"{BLOCKED_MARK}: {host} resolves to a private, loopback or link-local address")
            return ok

        socket.getaddrinfo = guarded
    try:
        yield
    finally:
        with _lock:
            socket.getaddrinfo = original


def redact_url(url: str) -> str:
    """The URL without credentials: no ``user:pass@``, sensitive query values replaced."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1] if "@" in parts.netloc else parts.netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SENSITIVE_PARAMS.match(k) for k, _ in pairs):
            query = urlencode([(k, "REDACTED" if _SENSITIVE_PARAMS.match(k) else v) for k, v in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Redact every URL and bearer/api-key looking token inside free text (error messages, logs)."""
    text = _URL_RE.sub(lambda m: redact_url(m.group(0)), text)
    return _BEARER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}REDACTED", text)
