"""Where media bytes come from: data: URLs, local files, http(s) URLs, each only as the policy allows.

The server's policy is closed by default (data: URLs only): a local path is read only under the
directory the operator names (as vLLM's --allowed-local-media-path), an http(s) URL is fetched
only from hosts on the allow-list, without following redirects (a redirect could leave the
list), with a timeout and a size cap counted while the body arrives. The library's `LLM.chat`
runs on the caller's own behalf and reads any local file.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from qwenkit.errors import QwenkitError

DEFAULT_MAX_MEDIA_BYTES = 20 << 20


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_path: Path | None = None  # None: no local files
    any_local_path: bool = False  # the library's trusted caller
    allowed_domains: tuple[str, ...] = ()  # http(s) hosts; "*" allows any; empty: no URL fetching
    max_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    timeout: float = 10.0


LIBRARY_POLICY = MediaPolicy(any_local_path=True, allowed_domains=("*",))


def decode_base64(data: str, what: str = "media") -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise QwenkitError(f"the {what} is not valid base64 ({exc})") from exc


def _data_url(url: str, policy: MediaPolicy) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise QwenkitError("a data: URL needs a comma before its data")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise QwenkitError(f"the media is larger than {policy.max_bytes} bytes")
    if header.endswith(";base64"):
        return decode_base64(payload)
    return unquote(payload).encode("latin-1", errors="replace")


def _local(path: Path, policy: MediaPolicy) -> bytes:
    if not policy.any_local_path:
        if policy.allowed_local_path is None:
            raise QwenkitError("local media files are not allowed on this server (see --allowed-local-media-path)")
        root = policy.allowed_local_path.resolve()
        if not path.resolve().is_relative_to(root):
            raise QwenkitError(f"local media must lie under {root}")
    try:
        size = path.stat().st_size
        if size > policy.max_bytes:
            raise QwenkitError(f"the media file is larger than {policy.max_bytes} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise QwenkitError(f"cannot read the media file {path.name!r} ({exc.strerror or exc})") from exc


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(d == "*" or host == d.lower() or host.endswith("." + d.lower()) for d in allowed)


def _http(url: str, host: str, policy: MediaPolicy) -> bytes:
    if not policy.allowed_domains:
        raise QwenkitError("fetching media from http(s) URLs is off on this server (see --allowed-media-domain); send a data: URL")
    if not _host_allowed(host, policy.allowed_domains):
        raise QwenkitError(f"media from {host!r} is not allowed on this server")
    import httpx

    try:
        with httpx.stream("GET", url, timeout=policy.timeout, follow_redirects=False) as response:
            if response.status_code != 200:
                raise QwenkitError(f"fetching the media answered HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
                raise QwenkitError(f"the media is larger than {policy.max_bytes} bytes")
            chunks, seen = [], 0
            for chunk in response.iter_bytes():
                seen += len(chunk)
                if seen > policy.max_bytes:
                    raise QwenkitError(f"the media is larger than {policy.max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise QwenkitError(f"cannot fetch the media ({type(exc).__name__}: {exc})") from exc


def load_media_bytes(source: str | Path | bytes, policy: MediaPolicy) -> bytes:
    """The bytes behind a data: URL, a file:// URL or path, or an http(s) URL, as `policy` allows."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, Path):
        return _local(source, policy)
    if not isinstance(source, str) or not source:
        raise QwenkitError("a media source must be a non-empty URL or path")
    if source.startswith("data:"):
        return _data_url(source, policy)
    parsed = urlparse(source)
    if parsed.scheme in ("http", "https"):
        return _http(source, parsed.hostname or "", policy)
    if parsed.scheme == "file":
        return _local(Path(unquote(parsed.path)), policy)
    if parsed.scheme and len(parsed.scheme) > 1:  # "C:\..." parses with scheme "c"
        raise QwenkitError(f"unsupported media URL scheme {parsed.scheme!r}; use data:, file:// or http(s)://")
    return _local(Path(source), policy)
