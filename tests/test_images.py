import asyncio
import base64
import http.server
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_app.ingress.errors import ImageError
from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy, decode_image
from tests.imaging import data_url, jpeg_with_orientation, pattern, png_bytes
from tests.loopback import loopback_http

MAX_PIXELS = 10_000_000


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    stored = pattern(120, 160, seed=3)  # stored landscape
    loaded = decode_image(jpeg_with_orientation(stored, 6), MAX_PIXELS)  # 6: rotate 90 clockwise for display
    assert (loaded.width, loaded.height) == (120, 160)
    expected = np.rot90(stored, k=-1)
    assert np.abs(loaded.pixels.astype(int) - expected.astype(int)).mean() < 6  # JPEG noise only


@pytest.mark.parametrize("name, make", [
    ("rgba", lambda: encode(Image.fromarray(np.dstack([pattern(20, 30), np.full((20, 30), 128, np.uint8)])), "PNG")),
    ("grayscale", lambda: encode(Image.fromarray(pattern(20, 30)[:, :, 0]), "PNG")),
    ("cmyk jpeg", lambda: encode(Image.fromarray(pattern(20, 30)).convert("CMYK"), "JPEG")),
    ("palette", lambda: encode(Image.fromarray(pattern(20, 30)).convert("P"), "PNG")),
])
def test_formats_become_rgb(name, make):
    loaded = decode_image(make(), MAX_PIXELS)
    assert loaded.pixels.shape == (20, 30, 3) and loaded.pixels.dtype == np.uint8


def test_sixteen_bit_png_is_scaled_not_clipped():
    grey = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    loaded = decode_image(encode(Image.fromarray(grey), "PNG"), MAX_PIXELS)
    assert loaded.pixels.shape == (30, 40, 3)
    assert loaded.pixels[0, 0, 0] == 0 and loaded.pixels[-1, -1, 0] == 255
    assert 120 < loaded.pixels[15, 20, 0] < 135  # mid-grey stays mid-grey


def test_animated_gif_uses_the_first_frame():
    frames = [Image.fromarray(np.full((10, 12, 3), v, np.uint8)) for v in (200, 10)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data, MAX_PIXELS).pixels.mean() > 150


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"<html>sign in</html>", "not a decodable image"),
    (png_bytes(pattern(50, 50))[:200], "cannot decode"),
])
def test_broken_images_are_image_errors(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data, MAX_PIXELS)


def test_pixel_cap_is_checked_before_decoding():
    data = encode(Image.new("L", (5000, 5000)), "PNG")
    with pytest.raises(ImageError, match="25000000 pixels; the limit is 1000000") as info:
        decode_image(data, 1_000_000)
    assert info.value.status_code == 413


def fetcher(**overrides) -> ImageFetcher:
    policy = dict(max_bytes=1_000_000, timeout_s=5, max_pixels=MAX_PIXELS)
    policy.update(overrides)
    return ImageFetcher(ImageSourcePolicy(**policy))


def test_data_urls_are_decoded():
    data = png_bytes(pattern(8, 8))
    assert asyncio.run(fetcher().fetch(data_url(data))) == data


def test_oversized_data_url_is_refused():
    with pytest.raises(ImageError, match="MAX_DOWNLOAD_BYTES"):
        asyncio.run(fetcher(max_bytes=100).fetch(data_url(b"x" * 1000)))


@pytest.mark.parametrize("url", ["file:///etc/passwd", "/etc/passwd", "ftp://example.com/a.png", "s3://b/k.png"])
def test_local_files_and_other_schemes_are_refused(url):
    with pytest.raises(ImageError):
        fetcher().resolve(url)


def test_relative_label_studio_urls_resolve_against_its_host():
    assert fetcher(label_studio_url="http://ls:8080").resolve("/data/upload/1/a.png") == \
        "http://ls:8080/data/upload/1/a.png"
    assert fetcher(label_studio_url="http://from-setup:8080").resolve("/data/upload/1/a.png") == \
        "http://from-setup:8080/data/upload/1/a.png"
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL"):
        fetcher().resolve("/data/upload/1/a.png")


def test_loopback_hosts_need_the_allowlist(image_server):
    url = f"{image_server}/img0.png"
    with pytest.raises(ImageError, match="non-public address") as info:
        asyncio.run(fetcher().fetch(url))
    assert info.value.status_code == 403
    data = asyncio.run(fetcher(host_allowlist=frozenset({"127.0.0.1"})).fetch(url))
    assert decode_image(data, MAX_PIXELS).width == 320


def test_http_errors_and_size_cap(image_server):
    allowed = frozenset({"127.0.0.1"})
    with pytest.raises(ImageError, match="HTTP 404"):
        asyncio.run(fetcher(host_allowlist=allowed).fetch(f"{image_server}/missing.png"))
    with pytest.raises(ImageError, match="MAX_DOWNLOAD_BYTES") as info:
        asyncio.run(fetcher(host_allowlist=allowed, max_bytes=100).fetch(f"{image_server}/img0.png"))
    assert info.value.status_code == 413


def test_document_root_serves_local_files_and_nothing_outside(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    data = png_bytes(pattern(8, 8))
    (root / "sub" / "a.png").write_bytes(data)
    (tmp_path / "secret.png").write_bytes(b"secret")
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    local = fetcher(document_root=str(root))

    for url in ("/data/local-files/?d=sub/a.png", str(root / "sub" / "a.png"), "/data/local-files/?d=/sub/a.png"):
        assert asyncio.run(local.fetch(local.resolve(url))) == data
    for url in ("/data/local-files/?d=../secret.png", "/data/local-files/?d=escape.png", str(tmp_path / "secret.png"),
                "/etc/passwd"):
        with pytest.raises(ImageError, match="outside the document root") as info:
            local.resolve(url)
        assert info.value.status_code == 403
    with pytest.raises(ImageError, match="no such file"):
        asyncio.run(local.fetch(local.resolve("/data/local-files/?d=sub/missing.png")))
    # a file:// URL in a task is still refused: only resolve() makes them, for paths inside the root
    with pytest.raises(ImageError, match="unsupported image URL"):
        local.resolve(f"file://{root}/sub/a.png")


def test_cloud_uris_are_presigned_by_label_studio_for_the_task():
    ls = fetcher(label_studio_url="http://ls:8080")
    url = ls.resolve("s3://bucket/dir/img 1.png", 42)
    encoded = base64.urlsafe_b64encode(b"s3://bucket/dir/img 1.png").decode()
    assert url == f"http://ls:8080/tasks/42/presign/?fileuri={encoded}"
    for uri in ("gs://b/k.jpg", "azure-blob://c/k.jpg"):
        assert ls.resolve(uri, 1).startswith("http://ls:8080/tasks/1/presign/?fileuri=")
    with pytest.raises(ImageError, match="needs the task's integer id"):
        ls.resolve("s3://bucket/k.png", None)
    with pytest.raises(ImageError, match="set LABEL_STUDIO_URL"):
        fetcher().resolve("s3://bucket/k.png", 1)


class PresignStandIn(http.server.BaseHTTPRequestHandler):
    """Stands in for Label Studio's presign endpoint and a cloud bucket, which cannot run here:
    /tasks/<id>/presign/ redirects to a 'bucket' on another host name, as Label Studio does for S3."""

    seen: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/tasks/7/presign/"):
            self.send_response(303)
            self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/bucket/img.png?sig=x")
            self.end_headers()
            return
        data = png_bytes(pattern(8, 8))
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_presigned_download_sends_the_key_to_label_studio_only(tmp_path):
    from serve_app.label_studio.credentials import LabelStudioCredentials

    async def fetch(base):
        async with httpx.AsyncClient() as client:
            policy = ImageSourcePolicy(max_bytes=10**6, timeout_s=5, max_pixels=MAX_PIXELS, label_studio_url=base,
                                       trust_label_studio_host=True, host_allowlist=frozenset({"localhost"}))
            credentials = LabelStudioCredentials(base, "legacy-key", client, "LABEL_STUDIO_API_KEY")
            images = ImageFetcher(policy, client, credentials)
            return await images.fetch(images.resolve("s3://bucket/img.png", 7))

    with loopback_http(PresignStandIn) as base:
        assert decode_image(asyncio.run(fetch(base)), MAX_PIXELS).width == 8
    (presign_path, presign_auth), (bucket_path, bucket_auth) = PresignStandIn.seen
    assert presign_path.startswith("/tasks/7/presign/?fileuri=") and presign_auth == "Token legacy-key"
    assert bucket_path == "/bucket/img.png?sig=x" and bucket_auth is None
