"""The media-path policy every frontend (RPC, HTTP) applies to images named by a local path:
off unless the server names a directory; a path must resolve (symlinks followed) inside it. And
the HTTP server's image URLs: data: as is, file:// and paths by that policy, http(s) fetched."""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any

from engine.sampling import RequestError

LOCAL_PATHS_OFF = ("local file paths are disabled on this server; start it with --allowed-local-media-path DIR, "
                   "or send the image as bytes or a data URL")


def media_dir_of(allowed_local_media_path: str | Path | None) -> Path | None:
    """The resolved directory (None: paths refused); ValueError if it is not a directory."""
    if allowed_local_media_path is None:
        return None
    media_dir = Path(allowed_local_media_path).resolve()
    if not media_dir.is_dir():
        raise ValueError(f"allowed_local_media_path {allowed_local_media_path} is not a directory")
    return media_dir


def check_local_path(media_dir: Path | None, path: str | PurePath, label: str) -> str:
    """The resolved path of an image named by `path` (relative paths from media_dir), so a
    symlink swapped after the check is not followed; RequestError (naming `label`) when paths
    are off or it resolves outside media_dir."""
    if media_dir is None:
        raise RequestError(f"{label}: {LOCAL_PATHS_OFF}")
    shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "..."
    try:
        resolved = (media_dir / path).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loop, NUL byte
        raise RequestError(f"{label}: cannot resolve the path {shown!r}: {e}") from e
    if not resolved.is_relative_to(media_dir):
        raise RequestError(f"{label}: {shown!r} is outside the allowed media directory {media_dir}")
    return str(resolved)


async def image_source(url: str, field: str, media_dir: Path | None, max_bytes: int, timeout_s: float) -> Any:
    """What the engine takes for an image URL: a data: URL as is, a local path (or file://)
    resolved under media_dir, the bytes of an http(s) URL (at most max_bytes, within timeout_s).
    RequestError naming `field` otherwise."""
    if url.startswith("data:"):
        return url
    if url.startswith(("http://", "https://")):
        return await _fetch(url, field, max_bytes, timeout_s)
    if url.startswith("file://"):
        url = url.removeprefix("file://")
    elif "://" in url:
        raise RequestError(f"{field}: unsupported URL scheme in {url[:40]!r}; use data:, http(s):, file:// or a path")
    return check_local_path(media_dir, url, field)


async def _fetch(url: str, field: str, max_bytes: int, timeout_s: float) -> bytes:
    try:
        import httpx
    except ImportError as e:
        raise RequestError(f"{field}: http(s) image URLs need the httpx package on the server") from e
    shown = url[:200]
    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=True) as client:
            async with client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise RequestError(f"{field}: GET {shown} answered {r.status_code}")
                data = bytearray()
                async for piece in r.aiter_bytes():
                    data += piece
                    if len(data) > max_bytes:
                        raise RequestError(f"{field}: the image at {shown} is over {max_bytes} bytes")
                return bytes(data)
    except httpx.HTTPError as e:
        raise RequestError(f"{field}: cannot fetch {shown} within {timeout_s:g} s: {type(e).__name__}: {e}") from e
