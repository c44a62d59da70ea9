"""The real service over HTTP: `serve run` on configs/serve.yaml with tiny models, fed the request
bodies a real Label Studio 1.23.2 sent (shared fixtures), with their images swapped for test images."""

from __future__ import annotations

import asyncio
import copy
import time

import httpx
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

from serve_app.ingress.images import decode_image
from serve_app.models.grounding_dino import GroundingDinoDetector
from serve_app.models.messages import DetectionRequest
from tests.configs import PREDICTED_VALUES_CONFIG
from tests.conftest import load_ls_fixture
from tests.imaging import data_url, pattern, png_bytes
from tests.serve_process import ServeProcess

pytestmark = pytest.mark.serve

IMAGE_SIZES = {"img0.png": (320, 240), "img1.png": (200, 300), "img2.png": (128, 96), "img3.png": (640, 480)}


@pytest.fixture(scope="module")
def service(tiny_models, image_server, tmp_path_factory):
    env = {
        "GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]),
        "USE_SAM": "true",
        "SAM_CHECKPOINT": str(tiny_models["sam"]),
        "IMAGE_HOST_ALLOWLIST": "127.0.0.1",
    }
    process = ServeProcess(env, tmp_path_factory.mktemp("serve")).start()
    print(f"service ready in {process.startup_s:.1f} s")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def local_detector(tiny_models):
    return GroundingDinoDetector.load(str(tiny_models["grounding_dino"]), device="cpu")


def batch_body(image_urls: list[str]) -> dict:
    """predict_batch.json as Label Studio sent it, one task per image URL."""
    body = copy.deepcopy(load_ls_fixture("predict_batch.json")["body"])
    template = body["tasks"][0]
    body["tasks"] = []
    for i, url in enumerate(image_urls):
        task = copy.deepcopy(template)
        task["id"], task["data"] = 100 + i, {"image": url}
        body["tasks"].append(task)
    return body


def interactive_body(image_url: str, prompt: str) -> dict:
    body = copy.deepcopy(load_ls_fixture("predict_interactive.json")["body"])
    body["tasks"][0]["data"]["image"] = image_url
    body["params"]["context"]["result"][0]["value"]["text"] = [prompt]
    return body


def regions(prediction: dict, kind: str) -> list[dict]:
    return [r for r in prediction["result"] if r["type"] == kind]


def assert_matches_pixel_boxes(prediction: dict, expected_boxes: np.ndarray, width: int, height: int):
    """Percent coordinates equal the detector's pixel boxes, as the in-process model computes them."""
    rects = regions(prediction, "rectanglelabels")
    assert len(rects) == len(expected_boxes) > 0
    for rect in rects:
        v = rect["value"]
        box = np.array([v["x"] * width, v["y"] * height, (v["x"] + v["width"]) * width,
                        (v["y"] + v["height"]) * height]) / 100.0
        assert np.abs(expected_boxes - box).max(axis=1).min() < 0.05


def test_health_answers_within_label_studios_limit(client):
    for path in ("/health", "/"):
        started = time.perf_counter()
        response = client.get(path)
        assert time.perf_counter() - started < 1.0  # Label Studio's ML_TIMEOUT_HEALTH
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "UP" and body["model_class"] == "GroundedSam"
        assert body["models_ready"] == {"detector": True, "segmenter": True}


def test_setup_returns_a_stable_version_naming_the_models(client):
    body = load_ls_fixture("setup.json")["body"]
    versions = {client.post("/setup", json=body).json()["model_version"] for _ in range(2)}
    assert versions == {"grounded-serve:grounding-dino-tiny-random+sam:sam-tiny-random"}


def test_setup_refuses_a_config_it_cannot_serve(client):
    response = client.post("/setup", json={"schema": "<View><Text name='t' value='$t'/></View>"})
    assert response.status_code == 400
    assert "no <Image> or <Video> tag" in response.json()["error"]


def test_batch_predict_one_result_per_task_in_order(client, image_server, local_detector):
    names = ["img1.png", "img0.png", "img3.png", "img2.png"]
    urls = [f"{image_server}/{n}" for n in names]
    urls.append(data_url(png_bytes(pattern(50, 70, seed=9))))
    body = batch_body(urls)
    assert body["params"]["context"] is None  # what "Retrieve predictions" sends
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    results = payload["results"]
    assert len(results) == 5
    expected_sizes = [IMAGE_SIZES[n] for n in names] + [(70, 50)]
    interface = LabelInterface(body["label_config"])
    for prediction, (width, height), url in zip(results, expected_sizes, urls):
        assert prediction["model_version"] == payload["model_version"]
        assert prediction["result"], f"no regions for {url[:60]}"
        for region in prediction["result"]:
            assert (region["original_width"], region["original_height"]) == (width, height)
        # no prompt: every label of the config is searched, and only config labels come back
        labels = {r["value"]["rectanglelabels"][0] for r in regions(prediction, "rectanglelabels")}
        assert labels <= {"cats", "house"}
        assert interface.validate_prediction({"result": prediction["result"]})
        brushes = regions(prediction, "brushlabels")
        assert len(brushes) == len(regions(prediction, "rectanglelabels"))
        mask = decode_rle(brushes[0]["value"]["rle"])
        assert mask.size == width * height * 4

    # percent coordinates against the same model run in-process on the same pixels
    image = decode_image(httpx.get(urls[0]).content, 10**8)
    expected = local_detector.detect([DetectionRequest(image.pixels, ["cats", "house"], 0.30, 0.25, 50)])[0]
    assert_matches_pixel_boxes(results[0], expected.boxes, image.width, image.height)


@pytest.mark.parametrize("prompt, label", [("brown cat_cats", "cats"), ("house", "house"), ("HOUSE", "house")])
def test_prompt_labels_reach_the_results(client, image_server, prompt, label):
    response = client.post("/predict", json=interactive_body(f"{image_server}/img0.png", prompt))
    assert response.status_code == 200, response.text
    [prediction] = response.json()["results"]
    assert prediction["result"]
    for region in prediction["result"]:
        assert region["value"][region["type"]] == [label]


def test_unmatched_prompt_returns_no_regions_and_says_why(client, image_server):
    response = client.post("/predict", json=interactive_body(f"{image_server}/img0.png", "dog"))
    assert response.status_code == 200
    assert response.json()["results"][0]["result"] == []
    assert "'dog' matches no label" in response.json()["warnings"][0]


def test_no_prompt_uses_predicted_values_and_config_thresholds(client, image_server):
    body = batch_body([])
    body["label_config"] = PREDICTED_VALUES_CONFIG
    body["tasks"] = [{"id": 7, "data": {"picture": f"{image_server}/img0.png"}}]
    [prediction] = client.post("/predict", json=body).json()["results"]
    assert prediction["result"]
    for region in prediction["result"]:
        assert region["from_name"] == "boxes" and region["to_name"] == "img"
        assert region["value"]["rectanglelabels"][0] in {"Cat", "Car"}
        assert region["score"] >= 0.2  # model_score_threshold


def test_exif_rotated_image_comes_out_upright(client, image_server, local_detector):
    url = f"{image_server}/exif6.jpg"
    [prediction] = client.post("/predict", json=interactive_body(url, "cats")).json()["results"]
    for region in prediction["result"]:
        # stored 160x120, shown rotated: Label Studio's coordinates are of the displayed 120x160 image
        assert (region["original_width"], region["original_height"]) == (120, 160)
    image = decode_image(httpx.get(url).content, 10**8)
    expected = local_detector.detect([DetectionRequest(image.pixels, ["cats"], 0.30, 0.25, 50)])[0]
    assert_matches_pixel_boxes(prediction, expected.boxes, 120, 160)


def test_a_bad_task_gets_an_empty_result_and_the_others_survive(client, service, image_server):
    urls = [f"{image_server}/img0.png", f"{image_server}/missing.png", f"{image_server}/not-an-image.png",
            "file:///etc/passwd", f"{image_server}/img2.png"]
    body = batch_body(urls)
    body["tasks"].insert(2, {"id": 999, "data": {"text": "no image key"}})
    before = service.settled_metrics()["counters"].get("task_errors", 0)
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 6
    # a failed task's entry is an empty list, which Label Studio stores nothing for: it stays retryable
    assert [r == [] for r in results] == [False, True, True, True, True, False]
    assert results[0]["result"] and results[5]["result"]
    errors = response.json()["task_errors"]  # for clients other than Label Studio, which ignores it
    assert [(e["index"], e["task"]) for e in errors] == [(1, 101), (2, 999), (3, 102), (4, 103)]
    assert "HTTP 404" in errors[0]["error"] and "no 'image' key" in errors[1]["error"]
    counters = service.metrics(until=lambda m: m["counters"].get("task_errors", 0) - before >= 4)["counters"]
    assert counters["task_errors"] - before == 4


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b'{"tasks": {"id": 1}}', "'tasks' must be a list"),
    (b'{"tasks": [], "label_config": "<View/>"}', "'tasks' is empty"),
    (b'{"tasks": [{"id": 1, "data": {}}], "label_config": "<View><Image"}', "not a valid labeling config"),
])
def test_bad_requests_are_clear_json_errors(client, content, message):
    response = client.post("/predict", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_bad_thresholds_in_the_context_are_refused(client, image_server):
    body = interactive_body(f"{image_server}/img0.png", "cats")
    body["params"]["context"]["result"].append(
        {"from_name": "box_threshold", "to_name": "image", "type": "number", "value": {"number": 7}})
    response = client.post("/predict", json=body)
    assert response.status_code == 400
    assert "box_threshold must be between 0 and 1" in response.json()["error"]


@pytest.mark.parametrize("fixture", ["webhook_annotation_created.json", "webhook_start_training.json"])
def test_webhooks_are_acknowledged_without_training(client, fixture):
    body = load_ls_fixture(fixture)["body"]
    response = client.post("/webhook", json=body)
    assert response.status_code == 200
    assert response.json()["action"] == body["action"]
    assert response.json()["trained"] is False


def test_concurrent_requests_are_batched_across_requests(client, service, image_server):
    """Requests from different callers, with different prompts, meet in one model batch."""
    prompts = ["cats", "house", "brown cat_cats", "big house_house"]

    async def fire():
        async with httpx.AsyncClient(base_url=service.url, timeout=120) as session:
            bodies = [interactive_body(f"{image_server}/img{i % 2}.png", prompts[i % 4]) for i in range(16)]
            return await asyncio.gather(*(session.post("/predict", json=b) for b in bodies))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 and len(r.json()["results"]) == 1 for r in responses)
    batches = service.metrics(until=lambda m: all(m["batch_sizes"].get(name, {}).get("max", 0) > 1
                                                  for name in ("Detector", "Segmenter")))["batch_sizes"]
    assert batches["Detector"]["max"] > 1, batches
    assert batches["Segmenter"]["max"] > 1, batches


def test_prometheus_exports_the_projects_metrics_next_to_serves(client, service, image_server):
    """Ray's own metrics endpoints (listed in its Prometheus service-discovery file) carry the batch-size
    histogram each model deployment records, tagged with the deployment, beside Serve's ray_serve_* series."""
    client.post("/predict", json=interactive_body(f"{image_server}/img1.png", "cats")).raise_for_status()
    found = service.prometheus(until=lambda families: "ray_grounded_serve_batch_size" in families)
    histogram = found.get("ray_grounded_serve_batch_size")
    assert histogram is not None and histogram.type == "histogram"
    counts = {s.labels["deployment"]: s.value for s in histogram.samples if s.name.endswith("_count")}
    assert counts.get("Detector", 0) >= 1 and counts.get("Segmenter", 0) >= 1
    assert any(name.startswith("ray_serve_") for name in found)  # Serve's own metrics, same endpoint
    assert "ray_grounded_serve_embedding_cache_lookups" in found and "ray_grounded_serve_events" in found


def test_model_replicas_start_with_the_malloc_tunables_and_the_ingress_without(service):
    """MODEL_MALLOC_REUSE (on): glibc reads its tunables when a process starts, so they must be in the environment
    Ray starts the model replicas with (their runtime_env), beside the application's own variables."""
    import psutil

    from serve_app.deployments.replica_memory import MALLOC_TUNABLES

    def start_environment(deployment: str) -> dict[str, str]:
        [pid] = service.replica_pids(deployment)
        return psutil.Process(pid).environ()  # /proc/PID/environ: the environment the process was started with

    first_tunable = MALLOC_TUNABLES.split(":")[0]  # glibc cuts the string it parsed at the first ':' in place
    for deployment in ("Detector", "Segmenter"):
        environment = start_environment(deployment)
        assert environment.get("GLIBC_TUNABLES", "").startswith(first_tunable), (deployment, environment)
        assert environment.get("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD") == "0", (deployment, environment)
    assert "GLIBC_TUNABLES" not in start_environment("Ingress")


def test_cpu_model_replicas_yield_the_cores_to_the_proxy_and_the_ingress(service):
    """MODEL_CPU_NICENESS (5): model replicas on CPU run niced more than the ingress and the proxy."""
    import os

    import psutil

    nice = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(proc.pid) != service.process.pid:
                continue
            title = " ".join(proc.info["cmdline"] or [])
            for name in ("Detector", "Segmenter", "Ingress", "ProxyActor"):
                if f":{name}" in title or title.startswith(f"ray::{name}"):
                    threads = [os.getpriority(os.PRIO_PROCESS, t.id) for t in proc.threads()]
                    nice[name] = (proc.nice(), max(threads), min(threads))
        except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            continue
    assert {"Detector", "Segmenter", "Ingress", "ProxyActor"} <= set(nice), nice
    # Ray starts its workers' Python threads at nice 15 and its C++ threads at 0; the model replicas add 5 to each
    for name in ("Detector", "Segmenter"):
        main, highest, lowest = nice[name]
        assert lowest >= 5 and main >= min(19, nice["Ingress"][0] + 4), nice
    assert nice["Ingress"][2] == 0 and nice["ProxyActor"][2] == 0, nice


def test_exemplar_boxes_to_a_detector_without_visual_prompts_are_a_clear_400(client, image_server):
    from tests.configs import EXEMPLAR_CONFIG

    body = copy.deepcopy(load_ls_fixture("predict_interactive.json")["body"])
    body["tasks"][0]["data"]["image"] = f"{image_server}/img0.png"
    body["label_config"] = EXEMPLAR_CONFIG
    body["params"]["context"]["result"] = [{
        "id": "ex1", "from_name": "exemplar", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
        "value": {"x": 10, "y": 10, "width": 25, "height": 40, "rotation": 0, "rectanglelabels": ["cats"]}}]
    response = client.post("/predict", json=body)
    assert response.status_code == 400
    assert "DETECTOR_MODEL=facebook/sam3" in response.json()["error"]


def test_video_tasks_get_one_track_per_object_as_the_pipeline_computes_them(client, image_dir, image_server,
                                                                            local_detector):
    """Two videos in one Retrieve: their sampled frames batch together in the Detector, and each video's tracks
    equal the in-process pipeline's on the same frames (batching across videos changes nothing)."""
    from serve_app.ingress.pipeline import LabellingPipeline, in_thread
    from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy
    from serve_app.settings import Settings
    from tests.test_video_tracks import CROSSING, VIDEO_CONFIG
    from tests.videos import Square, encode

    videos = {"cross.mp4": encode(CROSSING, seconds=3), "one.mp4": encode([Square("blue", 50, (0, 0), (40, 30))],
                                                                          seconds=3)}
    for name, data in videos.items():
        (image_dir / name).write_bytes(data)
    tasks = [{"id": 900 + i, "data": {"video": f"{image_server}/{name}"}} for i, name in enumerate(videos)]
    tasks.append({"id": 999, "data": {"video": f"{image_server}/img0.png"}})  # an image is not a video
    body = {"tasks": tasks, "label_config": VIDEO_CONFIG, "project": "7.1"}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert [e["task"] for e in payload["task_errors"]] == [999]
    assert "video" in payload["task_errors"][0]["error"]

    settings = Settings.load(env={"DEVICE": "cpu", "VIDEO_TRACK_FPS": "2"})  # the service's CPU default
    local = LabellingPipeline(settings=settings, model_version="v", detect=in_thread(local_detector.detect),
                              segment=None, fetcher=ImageFetcher(ImageSourcePolicy(
                                  max_bytes=10**8, timeout_s=5, max_pixels=10**8,
                                  host_allowlist=frozenset({"127.0.0.1"}))))
    expected = asyncio.run(local.predict({**body, "tasks": tasks[:2]}))["results"]
    interface = LabelInterface(VIDEO_CONFIG)
    for served, computed in zip(payload["results"][:2], expected):
        assert served["result"] and interface.validate_prediction(served) is True
        assert served["model_version"] == payload["model_version"]

        def tracks(prediction):
            return sorted((r["value"]["labels"][0], [(k["frame"], k["enabled"], k["x"], k["y"], k["width"],
                                                      k["height"]) for k in r["value"]["sequence"]])
                          for r in prediction["result"])

        for (label, got), (label_expected, want) in zip(tracks(served), tracks(computed), strict=True):
            assert label == label_expected and len(got) == len(want)
            for a, b in zip(got, want):
                assert a[:2] == b[:2] and a[2:] == pytest.approx(b[2:], abs=1e-3)
