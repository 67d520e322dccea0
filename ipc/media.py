"""The media-path policy every frontend (RPC, HTTP) applies to images named by a local path:
off unless the server names a directory; a path must resolve (symlinks followed) inside it."""

from __future__ import annotations

from pathlib import Path, PurePath

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
