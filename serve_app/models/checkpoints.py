"""Checkpoint sources: a local path, or an http(s) URL downloaded once into a cache directory.

Downloads are atomic (written to a `.part` file, verified, then renamed), so a download cut off
halfway is never loaded; concurrent replicas on one node share one download through a file lock.
Every failure is a CheckpointError naming the setting to fix.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from serve_app import get_logger
from serve_app.redaction import without_secrets
from serve_app.models.errors import CheckpointError

logger = get_logger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grounded-serve" / "checkpoints"
_CHUNK = 1 << 20
_PROGRESS_EVERY_S = 5.0


def is_url(source: str) -> bool:
    return source.lower().startswith(("http://", "https://"))


def is_checkpoint_file(source: str) -> bool:
    """A segment-anything state dict (a URL, or a path to a file) rather than a transformers model (a directory
    or a hub id such as `facebook/sam2.1-hiera-large`)."""
    if is_url(source) or source.lower().endswith((".pth", ".pt")):
        return True
    return os.path.isfile(os.path.expanduser(source))


def redacted(url: str) -> str:
    """A URL fit for logs and /health: no query string or fragment (presigned URLs carry their signature
    there) and no user:password."""
    return without_secrets(url)


def cached_path(url: str, cache_dir: Path) -> Path:
    """Where a URL is cached: a per-URL directory (same file names from different hosts never collide)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", unquote(Path(urlsplit(url).path).name)) or "checkpoint"
    return cache_dir / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_checkpoint(source: str, setting: str, cache_dir: str | Path | None = None, sha256: str = "",
                       timeout_s: float = 60.0) -> Path:
    """A local file for `source` (a path or URL), downloading it if needed."""
    if not source:
        raise CheckpointError(f"{setting} is empty: set it to a checkpoint path or URL")
    if not is_url(source):
        path = Path(source[len("file://"):] if source.startswith("file://") else source).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{setting}={source!r}: no such file")
        _verify(path, sha256, setting)
        return path

    target = cached_path(source, Path(cache_dir or DEFAULT_CACHE_DIR))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_suffix(target.suffix + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another replica may be downloading the same file
            if not target.is_file():
                _download(source, target, setting, timeout_s)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CheckpointError(f"{setting}: the disk is full while saving {redacted(source)} under {target.parent}; "
                                  "free space or set CHECKPOINT_CACHE_DIR") from None
        raise CheckpointError(f"{setting}: cannot write the checkpoint cache {target.parent}: {exc}; "
                              "set CHECKPOINT_CACHE_DIR to a writable directory") from None
    _verify(target, sha256, setting)
    return target


def _verify(path: Path, sha256: str, setting: str) -> None:
    if sha256 and _sha256_of(path) != sha256.lower():
        raise CheckpointError(f"{setting}: {path} does not have the expected sha256 {sha256} "
                              f"({setting}_SHA256); delete it to download again")


def _download(url: str, target: Path, setting: str, timeout_s: float) -> None:
    import httpx

    partial = target.with_suffix(target.suffix + ".part")
    logger.info("downloading %s (%s) to %s", redacted(url), setting, target)
    started = last_log = time.monotonic()
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=timeout_s) as response:
            if response.status_code != 200:
                raise CheckpointError(f"{setting}: downloading {redacted(url)} answered HTTP {response.status_code}")
            expected = int(response.headers.get("content-length") or 0)
            received = 0
            with open(partial, "wb") as out:
                for chunk in response.iter_bytes(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    if time.monotonic() - last_log > _PROGRESS_EVERY_S:
                        last_log = time.monotonic()
                        share = f" ({100 * received / expected:.0f} %)" if expected else ""
                        logger.info("downloading %s: %.1f MB%s", redacted(url), received / 1e6, share)
                out.flush()
                os.fsync(out.fileno())
        if expected and received != expected:
            raise CheckpointError(f"{setting}: the download of {redacted(url)} stopped at {received} of {expected} "
                                  "bytes")
        os.replace(partial, target)  # only complete files ever get the final name
        logger.info("downloaded %s: %.1f MB in %.1f s", redacted(url), received / 1e6, time.monotonic() - started)
    except httpx.HTTPError as exc:
        # httpx's message repeats the full URL: only its class is shown
        raise CheckpointError(f"{setting}: cannot download {redacted(url)}: {exc.__class__.__name__}") from None
    finally:
        partial.unlink(missing_ok=True)
