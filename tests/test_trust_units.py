"""Trust rules without Ray: where credentials go, which addresses and files are refused, what bad images
and ids become, and the bounds on memory. Each case failed, crashed or leaked on the code before it."""

from __future__ import annotations

import asyncio
import http.server
import io
import socket
import struct

import httpx
import numpy as np
import orjson
import pytest
from PIL import Image

from serve_app.ingress.errors import BadRequest, ImageError
from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy, decode_image
from serve_app.ingress.outbound import _is_public, pinned
from serve_app.label_studio.credentials import LabelStudioCredentials, choose_credential
from serve_app.ingress.memory import ByteBudget, task_bytes
from serve_app.ingress.pipeline import echoable_id
from tests.imaging import pattern, png_bytes
from tests.loopback import loopback_http

MAX_PIXELS = 10_000_000


# --- credentials go only where they were issued ----------------------------------------------------------

def test_an_environment_key_goes_only_to_label_studio_url():
    env = {"LABEL_STUDIO_API_KEY": "operator-key"}
    assert choose_credential(label_studio_url="http://ls:8080", setup_hostname="", setup_token="",
                             env=env) == ("http://ls:8080", "operator-key", "LABEL_STUDIO_API_KEY")
    # a /setup from another host is another Label Studio instance: never the operator's key (issue 29)
    assert choose_credential(label_studio_url="http://ls:8080", setup_hostname="http://attacker", setup_token="",
                             env=env) is None
    # without the URL the key goes nowhere (and the service refuses to start: tests/test_settings.py)
    assert choose_credential(label_studio_url="", setup_hostname="http://attacker", setup_token="", env=env) is None


def test_a_setup_token_goes_only_to_the_host_of_that_setup():
    chosen = choose_credential(label_studio_url="", setup_hostname="http://ls:8080", setup_token="t", env={})
    assert chosen[:2] == ("http://ls:8080", "t")
    # another instance beside the operator's: its own token, to its own host only
    assert choose_credential(label_studio_url="https://ls", setup_hostname="http://other", setup_token="t",
                             env={})[:2] == ("http://other", "t")
    assert choose_credential(label_studio_url="https://ls", setup_hostname="https://ls:443", setup_token="t",
                             env={})[:2] == ("https://ls:443", "t")


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None, str | None]] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        type(self).seen.append((self.path, self.headers.get("Authorization"), self.headers.get("Host")))
        data = png_bytes(pattern(8, 8))
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def fetch_all(base: str, urls: list[str], credential_base: str | None = None) -> list[bytes | Exception]:
    async def run():
        async with httpx.AsyncClient() as client:
            policy = ImageSourcePolicy(max_bytes=10**6, timeout_s=5, max_pixels=MAX_PIXELS, label_studio_url=base,
                                       trust_label_studio_host=True, host_allowlist=frozenset({"127.0.0.1"}))
            credentials = LabelStudioCredentials(credential_base or base, "legacy-key", client, "test")
            fetcher = ImageFetcher(policy, client, credentials)
            return await asyncio.gather(*(fetcher.fetch(fetcher.resolve(u)) for u in urls), return_exceptions=True)

    return asyncio.run(run())


def test_the_key_is_bound_to_scheme_host_and_port():
    RecordingHandler.seen = []
    with loopback_http(RecordingHandler) as base:
        port = int(base.rsplit(":", 1)[1])
        # the same host and port over another scheme is another origin: https://127.0.0.1:PORT gets nothing
        outcomes = fetch_all(base, [f"{base}/a.png", f"http://127.0.0.1:{port}/b.png"],
                             credential_base=f"https://127.0.0.1:{port}")
    assert all(isinstance(o, bytes) for o in outcomes)
    assert {auth for _, auth, _ in RecordingHandler.seen} == {None}


# --- addresses ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("address", [
    "64:ff9b::a9fe:a9fe",  # NAT64 for 169.254.169.254
    "64:ff9b:1::a00:1", "2002:a9fe:a9fe::1",  # local-use NAT64, 6to4 for 169.254.169.254
    "::a9fe:a9fe", "::ffff:10.0.0.1", "fec0::1", "2001:0:a9fe:a9fe::1", "::1", "fe80::1%eth0",
])
def test_addresses_that_reach_internal_hosts_are_not_public(address):
    assert not _is_public(address)


def test_public_addresses_stay_public():
    assert _is_public("93.184.216.34") and _is_public("2606:2800:220:1:248:1893:25c8:1946")


def test_the_checked_address_is_the_one_connected_to():
    """DNS rebinding: the name is resolved once; the request goes to that address, Host header kept."""
    RecordingHandler.seen = []
    lookups = []

    async def run(port):
        async with httpx.AsyncClient() as client:
            policy = ImageSourcePolicy(max_bytes=10**6, timeout_s=5, max_pixels=MAX_PIXELS)
            fetcher = ImageFetcher(policy, client)

            async def resolve(host, port_):
                lookups.append(host)
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port_))]

            fetcher.outbound._resolve = resolve
            import serve_app.ingress.outbound as outbound

            real = outbound._is_public
            outbound._is_public = lambda address: True  # stands in for a public answer, on loopback only
            try:
                return await fetcher.fetch(f"http://rebind.invalid:{port}/img.png")
            finally:
                outbound._is_public = real

    with loopback_http(RecordingHandler) as base:
        port = int(base.rsplit(":", 1)[1])
        data = asyncio.run(run(port))
    assert decode_image(data, MAX_PIXELS).width == 8
    assert lookups == ["rebind.invalid"]  # ".invalid" never resolves: httpx connected to the checked address
    assert RecordingHandler.seen == [("/img.png", None, f"rebind.invalid:{port}")]
    assert pinned("https://user@example.com:8443/a?b=1", "2001:db8::1") == \
        ("https://[2001:db8::1]:8443/a?b=1", "example.com:8443", "example.com")


# --- URLs, files and images that used to be internal errors ------------------------------------------------

def fetcher(**policy) -> ImageFetcher:
    return ImageFetcher(ImageSourcePolicy(max_bytes=10**6, timeout_s=5, max_pixels=MAX_PIXELS, **policy))


@pytest.mark.parametrize("url", ["http://host:99999/a.png", "http://[::1/a.png", "http://[zz::1]/a.png"])
def test_malformed_urls_are_task_errors(url):
    with pytest.raises(ImageError, match="malformed URL|cannot resolve|invalid"):
        asyncio.run(fetcher().fetch(url))


def test_local_file_paths_with_nul_bytes_or_file_components_are_task_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(pattern(8, 8)))
    images = fetcher(document_root=str(tmp_path))
    with pytest.raises(ImageError, match="unusable local file path"):
        images.resolve("/data/local-files/?d=%00")
    with pytest.raises(ImageError, match="cannot read"):
        asyncio.run(images.fetch(images.resolve("/data/local-files/?d=a.png/x")))


def test_images_outside_the_supported_formats_are_refused_unread():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageError, match="not a decodable image"):
        decode_image(eps, MAX_PIXELS)


def test_a_narrow_image_is_refused_before_any_model_sees_it():
    narrow = png_bytes(np.zeros((1, 3000, 3), np.uint8))
    assert len(narrow) < 200
    with pytest.raises(ImageError, match="3000x1") as info:
        decode_image(narrow, MAX_PIXELS)
    assert info.value.status_code == 422


def test_a_corrupt_tiff_is_a_task_error_whatever_pillow_raises():
    buffer = io.BytesIO()
    Image.fromarray(pattern(16, 16)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    count_offset = struct.unpack("<I", data[4:8])[0]
    for offset in range(count_offset, min(len(data), count_offset + 120), 3):  # mangle the directory
        mutated = bytes(data[:offset]) + b"\xff\x7f" + bytes(data[offset + 2:])
        try:
            decode_image(mutated, MAX_PIXELS)
        except ImageError:
            pass  # the only exception a task may see


# --- what the answer echoes ---------------------------------------------------------------------------------

def test_only_label_studio_like_ids_are_echoed():
    assert echoable_id(12) == 12 and echoable_id(2**64 - 1) == 2**64 - 1 and echoable_id("task-7") == "task-7"
    for bad in (2**64, -(2**63) - 1, "\ud800", "x" * 300, {"id": 1}, [1], True, 1.5):
        assert echoable_id(bad) is None
    orjson.dumps([echoable_id(v) for v in (2**64, "\ud800", 5)])  # never refused by the renderer


def test_the_answer_renders_whatever_the_request_echoed():
    from serve_app.ingress.json_codec import render_json

    nested: list = []
    for _ in range(300):
        nested = [nested]
    content = {"id": 2**70, "text": "a\ud800b", "deep": nested, "mask": np.arange(3, dtype=np.uint8)}
    rendered = render_json(content)
    import json

    parsed = json.loads(rendered)
    assert parsed["id"] == 2**70 and parsed["text"] == "a\ud800b" and parsed["mask"] == [0, 1, 2]


# --- memory ---------------------------------------------------------------------------------------------

def test_the_byte_budget_makes_tasks_wait_not_fail():
    async def scenario():
        budget = ByteBudget(100)
        order = []

        async def task(name, nbytes, hold_s):
            async with budget.hold(nbytes):
                order.append(f"{name}+")
                assert budget.used <= budget.capacity
                await asyncio.sleep(hold_s)
                order.append(f"{name}-")

        await asyncio.gather(task("a", 60, 0.05), task("b", 60, 0.01), task("huge", 10**9, 0.01))
        return order, budget.used

    order, used = asyncio.run(scenario())
    assert order.index("b+") > order.index("a-")  # b waited for a's bytes
    assert "huge+" in order and used == 0  # larger than the whole budget: runs alone, never stuck
    assert task_bytes(4000, 3000, masks=50) == 4000 * 3000 * 58


def test_setup_fields_are_checked_before_anything_changes():
    from serve_app.ingress.instances import setup_fields

    assert setup_fields({"hostname": "", "access_token": ""}, "http://ls:8080", "t") == ("http://ls:8080", "t")
    assert setup_fields({}, "http://ls:8080", "t") == ("http://ls:8080", "t")
    assert setup_fields({"hostname": "https://new/", "access_token": "u"}, "", "") == ("https://new", "u")
    for body, message in [({"hostname": "http://ls:99999"}, "not a valid URL"), ({"hostname": "ls"}, "http"),
                          ({"hostname": 5}, "must be a string"), ({"access_token": ["x"]}, "must be a string")]:
        with pytest.raises(BadRequest, match=message):
            setup_fields(body, "http://ls:8080", "t")


def test_request_json_keeps_the_json_modules_meaning_where_orjson_differs():
    """The ingress parses with orjson for speed, but a value orjson would change or refuse must mean what the json
    module makes of it (so it fails only its own task): big integers stay integers, lone surrogates stay."""
    import json

    from serve_app.ingress.json_codec import parse_json

    for body in (b'{"id": 123456789012345678901234567890, "x": [1, 2.5]}', b'{"a": "\\ud800"}',
                 b'{"tasks": [{"id": 18446744073709551616}]}', b'{"a": {"b": [true, null, -0.0, 1e-7]}}',
                 b'[' * 900 + b']' * 900):
        assert parse_json(body) == json.loads(body)
    with pytest.raises(RecursionError):  # the ingress answers it 400 "nested too deeply", as before
        parse_json(b'[' * 100_000 + b']' * 100_000)
    assert type(parse_json(b'{"id": 18446744073709551616}')["id"]) is int
    for refused in (b'{"a": NaN}', b'[Infinity]', b'{"a": -Infinity}', b'{', b''):
        with pytest.raises(ValueError):
            parse_json(refused)
