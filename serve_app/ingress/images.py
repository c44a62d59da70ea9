"""Fetching and decoding task images, with every cost bounded.

Sources: `data:` URLs, http(s) URLs, Label Studio relative URLs (`/data/upload/...`,
`/data/local-files/?d=...`) resolved against the Label Studio host, and cloud storage URIs
(`s3://`, `gs://`, `azure-blob://`) resolved through Label Studio's presign endpoint for the task,
as Label Studio's own tools do. Never local files. Hosts that resolve to loopback, private,
link-local or metadata addresses are refused unless they are the Label Studio host or listed
in IMAGE_HOST_ALLOWLIST; the check is repeated for every redirect.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote_to_bytes, urljoin, urlsplit

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app import get_logger
from serve_app.ingress.errors import ImageError
from serve_app.label_studio.credentials import LabelStudioAuthError, LabelStudioCredentials
from serve_app.ingress.outbound import OutboundPolicy, origin
from serve_app.redaction import redact_urls, shown_url

logger = get_logger(__name__)

MAX_REDIRECTS = 3
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
# What the service decodes; everything else (EPS through Ghostscript, PSD, ...) is refused unread. Pillow's
# JPEG opener also returns cameras' multi-picture (MPO) JPEGs.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
# Grounding DINO scales the longest side to at most 1333 px and SAM to 1024 px: beyond 1000:1 the short side
# would become less than a pixel and the model's preprocessing would fail for the whole batch.
MAX_ASPECT_RATIO = 1000


@dataclass(frozen=True)
class ImageSourcePolicy:
    max_bytes: int
    timeout_s: float
    max_pixels: int
    label_studio_url: str = ""  # base for relative URLs and the only host credentials are sent to
    # True when the URL comes from the operator (LABEL_STUDIO_URL); a hostname sent to /setup is not
    # trusted to be private, or anyone reaching /setup could point downloads at internal hosts.
    trust_label_studio_host: bool = False
    # Label Studio's LOCAL_FILES_DOCUMENT_ROOT, when this service sees the same disk: /data/local-files/?d=...
    # and bare paths inside it are read from disk; anything outside it is refused.
    document_root: str = ""
    host_allowlist: frozenset[str] = frozenset()  # host names or host:port allowed even if private


@dataclass(frozen=True)
class DownloadLimit:
    """What one download may cost: bytes, and seconds from connect to the last byte."""

    max_bytes: int
    timeout_s: float
    noun: str = "image"
    bytes_setting: str = "MAX_DOWNLOAD_BYTES"
    timeout_setting: str = "DOWNLOAD_TIMEOUT_S"

    def too_big(self, size: int) -> str:
        return f"{self.noun} is larger than {self.max_bytes} bytes ({size}+; {self.bytes_setting})"


@dataclass
class LoadedImage:
    pixels: np.ndarray  # H x W x 3 uint8 RGB, EXIF orientation applied
    width: int
    height: int


class ImageFetcher:
    def __init__(self, policy: ImageSourcePolicy, client: httpx.AsyncClient | None = None,
                 credentials: LabelStudioCredentials | None = None):
        self.policy = policy
        self._client = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
        self._ls_origin = origin(policy.label_studio_url) if policy.label_studio_url else None
        # which hosts may be connected to, at which address: shared with the Label Studio writes of this instance
        self.outbound = OutboundPolicy(policy.label_studio_url if policy.trust_label_studio_host else "",
                                       policy.host_allowlist)
        # sent only to the origin the credential was issued for (its base_url), never to another host or scheme
        self.credentials = credentials
        self._credential_origin = origin(credentials.base_url) if credentials else None

    async def aclose(self) -> None:
        await self._client.aclose()

    async def connect_target(self, url: str) -> tuple[str, dict[str, str], dict[str, str]]:
        """serve_app.ingress.outbound's checked, pinned target for an image URL."""
        return await self.outbound.connect_target(url, what="image host", error=ImageError)

    def resolve(self, url: str, task_id: object = None) -> str:
        if not isinstance(url, str) or not url.strip():
            raise ImageError("the task has no image URL")
        url = url.strip()
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("http", "https", "data"):
            return url
        base = self.policy.label_studio_url
        local = self._local_path(url) if not scheme else None
        if local is not None:
            return local.as_uri()
        if not scheme and url.startswith(("/data/", "/storage-data/", "/tasks/")):
            if not base:
                raise ImageError(f"{shown_url(url)!r} is relative to Label Studio; set LABEL_STUDIO_URL to fetch it")
            return urljoin(base.rstrip("/") + "/", url.lstrip("/"))
        if scheme in CLOUD_SCHEMES:
            if not base:
                raise ImageError(f"{shown_url(url)!r} is in cloud storage; set LABEL_STUDIO_URL so Label Studio can presign it")
            if not isinstance(task_id, int) or isinstance(task_id, bool):
                raise ImageError(f"{shown_url(url)!r} is in cloud storage; presigning it needs the task's integer id")
            encoded = base64.urlsafe_b64encode(url.encode()).decode()
            return f"{base.rstrip('/')}/tasks/{task_id}/presign/?fileuri={encoded}"
        raise ImageError(f"unsupported image URL {shown_url(url, 100)!r}: only http(s), data, Label Studio /data/ paths and "
                         "s3/gs/azure-blob URIs are fetched")

    def _local_path(self, url: str) -> Path | None:
        """A path inside the document root for `/data/local-files/?d=rel` or a bare absolute path, else None."""
        if not self.policy.document_root:
            return None
        root = Path(self.policy.document_root).resolve()
        parts = urlsplit(url)
        if parts.path.rstrip("/") == "/data/local-files":  # ?d= is relative to the root, as in Label Studio
            candidate = root / parse_qs(parts.query).get("d", [""])[-1].lstrip("/")
        elif url.startswith("/") and not url.startswith(("/data/", "/storage-data/", "/tasks/")):
            candidate = Path(url)  # a bare absolute path
        else:
            return None
        try:
            candidate = candidate.resolve()  # symlinks and ".." are resolved before the check
        except (ValueError, OSError) as exc:  # a NUL byte in the path, a symlink loop
            raise ImageError(f"unusable local file path {shown_url(url)!r}: {exc}") from None
        if not candidate.is_relative_to(root):
            raise ImageError(f"{shown_url(url)!r} is outside the document root (LOCAL_FILES_DOCUMENT_ROOT)", status_code=403)
        return candidate

    async def fetch(self, url: str) -> bytes:
        chunks: list[bytes] = []
        await self._fetch_into(url, chunks.append, self._image_limit)
        return b"".join(chunks)

    async def fetch_file(self, url: str, directory: Path, limit: DownloadLimit) -> Path:
        """A large file (a video) streamed to disk under `directory`, never whole in memory; a local file in the
        document root is used where it is."""
        if url.startswith("file://"):
            path = _file_path(url)
            await asyncio.to_thread(self._check_local, path, limit)
            return path
        target = directory / "download"
        with target.open("wb") as sink:
            await self._fetch_into(url, sink.write, limit)
        return target

    async def _fetch_into(self, url: str, write, limit: DownloadLimit) -> None:
        if url.startswith("data:"):
            write(self._decode_data_url(url, limit))
            return
        if url.startswith("file://"):
            write(await asyncio.to_thread(self._read_local, _file_path(url)))
            return
        try:
            await asyncio.wait_for(self._download(url, write, limit), timeout=limit.timeout_s)
        except asyncio.TimeoutError:
            raise ImageError(f"downloading {shown_url(url)!r} took longer than {limit.timeout_s:g} s "
                             f"({limit.timeout_setting})", status_code=504) from None
        except httpx.HTTPError as exc:
            raise ImageError(f"cannot download {shown_url(url)!r}: {exc.__class__.__name__}: {redact_urls(str(exc))}",
                             status_code=502) from None

    @property
    def _image_limit(self) -> DownloadLimit:
        return DownloadLimit(self.policy.max_bytes, self.policy.timeout_s)

    async def _download(self, url: str, write, limit: DownloadLimit) -> None:
        refreshed = False
        redirects = 0
        while redirects <= MAX_REDIRECTS:
            # Connect to the address that was checked, not to the name: a second DNS answer (rebinding) could
            # point at an internal host. The Host header and TLS server name stay the URL's.
            target, headers, extensions = await self.connect_target(url)
            to_label_studio = self._ls_origin is not None and origin(url) == self._ls_origin
            with_credential = self.credentials is not None and origin(url) == self._credential_origin
            if with_credential:
                try:
                    headers = {**headers, **await self.credentials.headers(force_refresh=refreshed)}
                except LabelStudioAuthError as exc:
                    raise ImageError(str(exc), status_code=502) from None
            async with self._client.stream("GET", target, headers=headers, extensions=extensions) as response:
                if (response.status_code == 401 and with_credential
                        and self.credentials.is_personal_access_token and not refreshed):
                    refreshed = True  # the access token may have just expired: exchange once more
                    continue
                if to_label_studio and response.status_code != 200 and not response.is_redirect:
                    used = self.credentials.describe() if with_credential else "no credential"
                    hint = {401: "; set LABEL_STUDIO_API_KEY to a valid token",
                            403: "; the token's user cannot see this project",
                            404: "; the file is not in Label Studio"}.get(response.status_code, "")
                    raise ImageError(f"Label Studio answered HTTP {response.status_code} for {shown_url(url)!r} "
                                     f"(sent: {used}){hint}", status_code=502)
                if response.is_redirect:
                    redirects += 1
                    url = urljoin(url, response.headers.get("location", ""))
                    if urlsplit(url).scheme not in ("http", "https"):
                        raise ImageError("image redirect to a non-http URL refused", status_code=403)
                    continue
                if response.status_code != 200:
                    raise ImageError(f"image URL answered HTTP {response.status_code}: {shown_url(url)!r}",
                                     status_code=502 if response.status_code >= 500 else 422)
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limit.max_bytes:
                    raise ImageError(limit.too_big(int(declared)), status_code=413)
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit.max_bytes:
                        raise ImageError(limit.too_big(size), status_code=413)
                    write(chunk)
                return
        raise ImageError(f"more than {MAX_REDIRECTS} redirects for {shown_url(url)!r}")

    def _check_local(self, path: Path, limit: DownloadLimit) -> int:
        # only paths that resolve() put inside the document root get a file:// URL
        if not self.policy.document_root or not path.is_relative_to(Path(self.policy.document_root).resolve()):
            raise ImageError("local files are read only inside LOCAL_FILES_DOCUMENT_ROOT", status_code=403)
        with _local_file_errors(path):
            if path.is_dir():
                raise IsADirectoryError(path.name)
            size = path.stat().st_size
        if size > limit.max_bytes:
            raise ImageError(limit.too_big(size), status_code=413)
        return size

    def _read_local(self, path: Path) -> bytes:
        self._check_local(path, self._image_limit)
        with _local_file_errors(path):
            return path.read_bytes()

    def _decode_data_url(self, url: str, limit: DownloadLimit | None = None) -> bytes:
        limit = limit or self._image_limit
        header, sep, payload = url.partition(",")
        if not sep:
            raise ImageError("malformed data URL: no ',' separator")
        # base64 inflates by 4/3: refuse before decoding anything large
        if len(payload) > limit.max_bytes * 4 // 3 + 4:
            raise ImageError(limit.too_big(len(payload) * 3 // 4), status_code=413)
        if header.endswith(";base64"):
            try:
                return base64.b64decode(payload, validate=False)
            except (binascii.Error, ValueError) as exc:
                raise ImageError(f"malformed base64 in data URL: {exc}") from None
        return unquote_to_bytes(payload)


def _file_path(url: str) -> Path:
    return Path(unquote_to_bytes(urlsplit(url).path).decode())


@contextlib.contextmanager
def _local_file_errors(path: Path):
    """A local file's OS errors as the task's ImageError: missing 404, not readable 403, anything else 422."""
    try:
        yield
    except FileNotFoundError:
        raise ImageError(f"no such file in the document root: {path.name!r}", status_code=404) from None
    except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        raise ImageError(f"cannot read {path.name!r}: {exc.__class__.__name__}", status_code=403) from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot read {path.name!r}: {exc.__class__.__name__}") from None


@contextlib.contextmanager
def _as_image_errors():
    """Every way Pillow can fail on hostile bytes becomes a per-task ImageError (422), never a 500."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb limit is checked from the header, like ours; ours gives the message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not a decodable image (supported: {', '.join(IMAGE_FORMATS)})") \
            from None
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many types on corrupt files
        raise ImageError(f"cannot decode the image: {exc.__class__.__name__}: {str(exc)[:200]!r}") from None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read, refused when too large or too narrow for the models."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{exc}; the limit is {max_pixels} (MAX_IMAGE_PIXELS)", status_code=413) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
                         "(MAX_IMAGE_PIXELS)", status_code=413)
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(f"image is {width}x{height}: the models cannot use an image narrower than "
                         f"1:{MAX_ASPECT_RATIO}")
    return image


def image_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header alone: what decoding will cost is known before it starts."""
    with _as_image_errors():
        return _open(data, max_pixels).size


def decode_image(data: bytes, max_pixels: int) -> LoadedImage:
    """Decode to RGB uint8 with EXIF orientation applied, refusing oversized images before decoding."""
    with _as_image_errors():
        image = _open(data, max_pixels)
        image.seek(0)  # first frame of animations
        image.load()
        image = ImageOps.exif_transpose(image)
        pixels = _to_rgb(image)
    return LoadedImage(pixels=pixels, width=pixels.shape[1], height=pixels.shape[0])


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey: scale to 8 bits instead of clipping (PIL's convert clips at 255)
        grey = np.asarray(image, dtype=np.float32)  # 4 bytes a pixel at the peak, not float64's 8
        top = 65535.0 if image.mode.startswith("I;16") or grey.max() > 255 else 255.0
        grey = np.clip(grey / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if image.mode == "F":
        grey = np.asarray(image, dtype=np.float32)
        span = float(grey.max() - grey.min()) or 1.0
        grey = ((grey - grey.min()) / span * 255.0 + 0.5).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()
