"""Hostile and broken input, overload and faults, against the real service with Basic auth on.

The service runs with small limits so that overload and timeouts are cheap to reach: one ingress
request at a time plus one queued, 3 s image downloads, 8 tasks in flight per request, a 30 s Serve
request timeout, and a detector
that waits up to 3 s to fill a batch (so a request is reliably inside the replica when it is killed).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import http.server
import json
import os
import re
import signal
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.configs import SEED_CONFIG
from tests.conftest import load_ls_fixture
from tests.imaging import data_url, pattern, png_bytes
from tests.loopback import loopback_http
from tests.serve_process import ServeProcess
from tests.waiting import wait_until

pytestmark = pytest.mark.serve

AUTH = ("annotator", "correct horse battery staple")
GOOD_IMAGE = png_bytes(pattern(120, 160, seed=5))


class TrickyImages(http.server.BaseHTTPRequestHandler):
    """/good.png, /slow/<seconds>.png, /redirect-to-metadata, /redirect-to-loopback-name."""

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/slow/"):
            time.sleep(float(self.path.split("/")[2].removesuffix(".png")))
        if self.path == "/redirect-to-metadata":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
            return
        if self.path == "/redirect-to-loopback-name":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/good.png")
            self.end_headers()
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(GOOD_IMAGE)))
            self.end_headers()
            self.wfile.write(GOOD_IMAGE)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def images():
    with loopback_http(TrickyImages) as url:
        yield url


def small_limits(config):
    # the slowest request that must succeed (one queued behind another, each a 2 s download and a 3 s batch wait)
    # takes about 11 s on a quiet machine: 30 s leave room for a loaded one
    config["http_options"]["request_timeout_s"] = 30
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "Ingress":
            deployment.update(max_ongoing_requests=1, max_queued_requests=1,
                              backpressure_config={"status_code": 503, "retry_after_s": 7})
        if deployment["name"] == "Detector":
            deployment["user_config"]["batch_wait_timeout_s"] = 3.0
            # Serve's status shows a killed replica as running until its next health check: the retry waits
            # that long before it can answer 503, and all of it must fit in the 30 s request timeout
            deployment["health_check_period_s"] = 2


@pytest.fixture(scope="module")
def service(tiny_models, tmp_path_factory):
    env = {
        "GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]),
        "USE_SAM": "true",
        "SAM_CHECKPOINT": str(tiny_models["sam"]),
        "IMAGE_HOST_ALLOWLIST": "127.0.0.1",  # the IP, not the name "localhost"
        "DOWNLOAD_TIMEOUT_S": "3",
        "TASK_CONCURRENCY": "8",  # = the detector batch size: full batches start at once
        "MAX_IMAGE_PIXELS": "4000000",
        "BASIC_AUTH_USER": AUTH[0],
        "BASIC_AUTH_PASS": AUTH[1],
        "REPLICA_RETRY_TIMEOUT_S": "5",  # within the 30 s request timeout: a lost replica means a 503
        "PREDICT_DEADLINE_S": "60",  # beyond the request timeout: the timeout, not a deadline answer, ends a request
    }
    process = ServeProcess(env, tmp_path_factory.mktemp("serve"), config_overrides=small_limits).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service.url, auth=AUTH, timeout=60) as client:
        yield client


def body_for(urls: list[str], prompt: str | None = None) -> dict:
    body = copy.deepcopy(load_ls_fixture("predict_batch.json")["body"])
    template = body["tasks"][0]
    body["tasks"] = [dict(copy.deepcopy(template), id=i + 1, data={"image": url}) for i, url in enumerate(urls)]
    body["label_config"] = SEED_CONFIG
    if prompt is not None:
        body["params"]["context"] = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                                                 "value": {"text": [prompt]}}]}
    return body


# --- auth -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path", [("POST", "/predict"), ("POST", "/setup"), ("POST", "/webhook"),
                                          ("GET", "/metrics")])
def test_every_route_but_health_needs_basic_auth(service, method, path):
    for auth in (None, (AUTH[0], "wrong"), ("wrong", AUTH[1])):
        response = httpx.request(method, f"{service.url}{path}", json={}, auth=auth, timeout=30)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Basic realm="grounded-serve", charset="UTF-8"'
        assert response.json()["error"] == "authentication required (HTTP Basic)"
    for open_path in ("/health", "/"):
        assert httpx.get(f"{service.url}{open_path}", timeout=30).status_code == 200


def test_garbage_authorization_headers_are_401(service):
    for header in ("Basic", "Basic !!!", "Bearer abc", "Basic " + base64.b64encode(b"no-colon").decode()):
        response = httpx.get(f"{service.url}/metrics", headers={"Authorization": header}, timeout=30)
        assert response.status_code == 401


# --- per-task isolation and image sources ---------------------------------------------------------

def test_one_bad_task_in_twenty_loses_nothing_else(client, images):
    urls = [f"{images}/good.png"] * 20
    urls[7] = f"{images}/slow/5.png"  # slower than DOWNLOAD_TIMEOUT_S
    response = client.post("/predict", json=body_for(urls))
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 20
    assert [i for i, r in enumerate(results) if r == []] == [7]  # failed: nothing for Label Studio to store


@pytest.mark.parametrize("url, reason", [
    ("http://localhost:{port}/good.png", "resolves to a non-public address"),  # a name for 127.0.0.1
    ("{images}/redirect-to-metadata", "non-public address (169.254.169.254)"),
    ("{images}/redirect-to-loopback-name", "resolves to a non-public address"),
    ("http://10.1.2.3/x.png", "non-public address (10.1.2.3)"),
    ("http://[::1]:80/x.png", "non-public address (::1)"),
    ("file:///etc/passwd", "unsupported image URL"),
    ("/etc/passwd", "unsupported image URL"),
    ("data:image/png;base64,AAAA", "not a decodable image"),
])
def test_refused_sources_give_empty_results_and_a_logged_reason(client, service, images, url, reason):
    url = url.format(images=images, port=images.rsplit(":", 1)[1])
    response = client.post("/predict", json=body_for([url, f"{images}/good.png"]))
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert first == [] and second["result"]
    assert service.wait_for_log(re.escape(reason))


def test_decompression_bomb_is_refused_before_decoding(client, service):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, "PNG")  # 100 MP of zeros: a few KB compressed
    response = client.post("/predict", json=body_for([data_url(buffer.getvalue())]))
    assert response.status_code == 200 and response.json()["results"][0] == []
    assert service.wait_for_log(re.escape("= 100000000 pixels; the limit is 4000000 (MAX_IMAGE_PIXELS)"))


# --- overload and faults --------------------------------------------------------------------------

def test_overload_gets_503_with_retry_after(service, images):
    """One request runs, one waits; the rest are turned away at once instead of queueing without bound."""
    async def burst():
        async with httpx.AsyncClient(base_url=service.url, auth=AUTH, timeout=60) as session:
            slow = body_for([f"{images}/slow/2.png"])
            return await asyncio.gather(*(session.post("/predict", json=slow) for _ in range(6)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 1 and codes.count(503) >= 3, codes
    assert set(codes) <= {200, 503}
    assert all(r.headers.get("retry-after") == "7" for r in responses if r.status_code == 503)


def test_requests_never_outlive_the_serve_timeout(client, images):
    """A hundred 2.9 s downloads, eight at a time (38 s), take longer than the 30 s request timeout set for this test:
    Label Studio still gets an answer, an error status, in time."""
    started = time.monotonic()
    response = client.post("/predict", json=body_for([f"{images}/slow/2.9.png"] * 100))
    elapsed = time.monotonic() - started
    assert elapsed < 45  # the timeout, and some room for the answer
    assert response.status_code in (408, 504)


def detector_requests_in_progress(service: ServeProcess) -> float | None:
    """Requests inside the Detector's replicas now: Serve's gauge, from Ray's Prometheus export (1 s reports);
    None while an exporter does not answer."""
    try:
        family = service.prometheus().get("ray_serve_replica_processing_queries")
    except httpx.HTTPError:
        return None
    return sum(s.value for s in family.samples if s.labels.get("deployment") == "Detector") if family else 0


def test_a_detector_replica_killed_mid_request_means_retry_or_503(client, service, images):
    [pid] = service.replica_pids("Detector")
    wait_until(lambda: detector_requests_in_progress(service) == 0, 30, "the detector going quiet", every_s=0.5)
    killed = []  # None once the replica is killed with the request inside, else why not

    def kill_once_inside():
        # the request's three items (one a task) wait in the replica's 3 s batch window, a batch of three of eight
        try:
            wait_until(lambda: (detector_requests_in_progress(service) or 0) >= 3, 10,
                       "the request's items reaching the detector replica", every_s=0.1)
        except AssertionError as exc:
            killed.append(exc)
            return
        os.kill(pid, signal.SIGKILL)
        killed.append(None)

    killer = threading.Thread(target=kill_once_inside)
    killer.start()
    started = time.monotonic()
    response = client.post("/predict", json=body_for([f"{images}/good.png"] * 3, prompt="cats"), timeout=120)
    killer.join()
    assert killed == [None], killed
    assert time.monotonic() - started < 60
    if response.status_code == 200:
        assert all(r["result"] for r in response.json()["results"])  # retried on the restarted replica
    else:
        assert response.status_code == 503 and response.headers["retry-after"]
    # the service recovers: a new replica serves the next request
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        again = client.post("/predict", json=body_for([f"{images}/good.png"], prompt="cats"))
        if again.status_code == 200 and again.json()["results"][0] != [] and again.json()["results"][0]["result"]:
            break
        time.sleep(2)
    else:
        pytest.fail("the detector did not come back")
    counters = service.metrics(until=lambda m: m["counters"].get("detector_replica_failures", 0) >= 1,
                               auth=AUTH)["counters"]
    assert counters.get("detector_replica_failures", 0) >= 1


# --- fuzzing --------------------------------------------------------------------------------------

# Nesting thousands deep is written into the JSON text, not built as Python lists (json.dumps and hypothesis's
# own printing would hit the recursion limit first): a placeholder string becomes that many brackets.
DEEP = "deep-nesting-placeholder-"


def dumps(body) -> bytes:
    text = json.dumps(body)  # lone surrogates become \\ud800 escapes, NaN stays NaN, as careless clients send
    return re.sub(rf'"{DEEP}(\d+)"', lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), text).encode()


# The nasty values ordinary strategies skip: lone surrogates (st.text excludes them), integers beyond 64 bits,
# NaN and infinities, nesting thousands deep.
nasty_text = st.text(alphabet=st.characters(codec=None, categories=["Cs", "Lu", "Nd", "Zs"]), max_size=8)
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=10**4000)
           | st.floats() | st.text(max_size=30) | nasty_text)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10) | nasty_text, children,
                                                                      max_size=4),
    max_leaves=12,
) | st.integers(min_value=100, max_value=5000).map(lambda depth: f"{DEEP}{depth}")
image_values = st.sampled_from(["", "data:,", "data:image/png;base64,@@", "http://", "/data/upload/1/x.png",
                                "s3://bucket/key.png", data_url(GOOD_IMAGE), "\x00", "http://127.0.0.1:1/x.png"]) | \
    st.text(max_size=40) | json_values
tasks = st.lists(st.one_of(json_values, st.fixed_dictionaries({"id": json_values, "data": st.one_of(
    json_values, st.fixed_dictionaries({"image": image_values}))})), max_size=4)
keyframes = st.lists(st.fixed_dictionaries({name: json_values for name in ("frame", "x", "y", "width", "height")}),
                     max_size=2) | json_values
contexts = st.one_of(json_values, st.fixed_dictionaries({"result": st.lists(st.fixed_dictionaries({
    "type": st.sampled_from(["textarea", "number", "rectanglelabels", "videorectangle"]) | st.text(max_size=8),
    "from_name": st.sampled_from(["prompt", "box_threshold", "text_threshold"]) | st.text(max_size=8),
    "id": json_values,
    "value": st.fixed_dictionaries({"text": json_values, "number": json_values, "sequence": keyframes,
                                    "labels": json_values})}), max_size=3)}))
predict_bodies = st.one_of(json_values, st.fixed_dictionaries({
    "tasks": tasks,
    "label_config": st.sampled_from([SEED_CONFIG, "<View>", "", "<View><Image name='i' value='$i'/></View>"])
    | st.text(max_size=40) | json_values,
    "params": st.one_of(json_values, st.fixed_dictionaries({"context": contexts})),
}))


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(["/predict", "/setup", "/webhook"]), body=predict_bodies)
def test_fuzzed_bodies_never_get_a_500(client, path, body):
    response = client.post(path, content=dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code < 500, (path, body, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    if path == "/predict" and response.status_code == 200:
        assert len(response.json()["results"]) == len(body["tasks"])
        assert all(r == [] or isinstance(r, dict) for r in response.json()["results"])


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_fuzzed_raw_bytes_never_get_a_500(client, raw):
    response = client.post("/predict", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
