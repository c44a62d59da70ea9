"""Several Label Studio instances on one service (issue 29), without Ray: the per-project table of /setup hosts and
tokens, its cap and expiry, the operator's instance, and that the job board keeps claims apart per instance."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.ingress.instances import LabelStudioInstances, origin_text
from serve_app.ingress.jobs import JobBoard
from serve_app.label_studio.credentials import choose_credential
from serve_app.ingress.pipeline import LabellingPipeline, TaskOutcome
from serve_app.settings import Settings
from tests.configs import SEED_CONFIG


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def table(capacity=3, ttl_s=100.0, pinned_origin="", clock=None):
    made = []

    def make(hostname, token):
        made.append((hostname, token))
        return ("fetcher", hostname, token, len(made))

    return LabelStudioInstances(make, capacity=capacity, ttl_s=ttl_s, pinned_origin=pinned_origin,
                                clock=clock or Clock()), made


def test_two_instances_with_the_same_project_id_keep_their_own_host_and_token():
    instances, _ = table()
    a = instances.setup("1.1795641121", "http://127.0.0.1:8080", "token-a")
    b = instances.setup("1.1795641999", "http://127.0.0.1:8082", "token-b")
    [found_a] = instances.lookup("1.1795641121")
    [found_b] = instances.lookup("1.1795641999")
    assert found_a.fetcher[1:3] == ("http://127.0.0.1:8080", "token-a")
    assert found_b.fetcher[1:3] == ("http://127.0.0.1:8082", "token-b")
    assert a.origin == "http://127.0.0.1:8080" and b.origin == "http://127.0.0.1:8082"
    assert instances.lookup("1.1") == []  # never set up: the caller falls back to the operator's instance


def test_the_same_setup_again_keeps_its_fetcher_and_a_new_token_makes_a_new_one():
    instances, made = table()
    first = instances.setup("2.1", "http://ls:8080", "t1").fetcher
    assert instances.setup("2.1", "http://ls:8080", "t1").fetcher is first and len(made) == 1
    assert instances.setup("2.1", "http://ls:8080", "t2").fetcher is not first and len(made) == 2


def test_the_table_is_bounded_in_count_and_in_time():
    clock = Clock()
    instances, _ = table(capacity=3, ttl_s=100, clock=clock)
    for i in range(1_000):  # a flood of /setup calls with new hostnames
        instances.setup(f"{i}.1", f"http://host{i}.example", "t")
    for i in range(1_000):  # and with one name from many hosts
        instances.setup("7.7", f"http://other{i}.example", "t")
    assert len(instances) == 3 and len(instances.lookup("7.7")) == 4
    assert instances.lookup("999.1") and not instances.lookup("0.1")
    clock.now = 50
    instances.lookup("998.1")  # used: stays
    clock.now = 120
    assert instances.lookup("998.1") and not instances.lookup("999.1")  # expired after 100 s unused


def test_one_project_name_on_two_instances_keeps_both_and_the_operators_comes_first():
    instances, _ = table(pinned_origin=origin_text("http://ls:8080"))
    instances.setup("1.17", "http://ls:8080/", "t")
    instances.setup("1.17", "http://other.example", "x")  # another instance's project 1, created the same second
    assert [i.origin for i in instances.lookup("1.17")] == ["http://ls:8080", "http://other.example:80"]
    assert instances.known("1.17").origin == "http://other.example:80"  # the most recent /setup
    assert instances.known("1.17", "http://ls:8080").token == "t"


def test_a_request_goes_to_the_instance_that_holds_its_task():
    """Two instances with the same project name and task ids: each is asked, with its own token, for the request's
    tasks; the one holding all of them with the request's images is the owner (a task both hold the same way does not
    decide it). No token reaches the other host."""
    import http.server
    import json

    import httpx

    from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy
    from serve_app.ingress.instances import owner_of
    from serve_app.label_studio.credentials import LabelStudioCredentials
    from tests.loopback import loopback_http

    seen = []

    def instance_handler(token, image):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                seen.append((self.server.server_address[1], self.headers.get("Authorization")))
                ok = self.headers.get("Authorization") == f"Token {token}" and \
                    self.path.startswith("/api/projects/1/export?") and "ids%5B%5D=1" in self.path
                rows = [{"id": 1, "data": {"image": image}}, {"id": 2, "data": {"image": "/same/for/both.png"}}]
                body = json.dumps(rows if ok else {"detail": "no"}).encode()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        return Handler

    async def scenario(a_url, b_url):
        async with httpx.AsyncClient() as http:
            policy = ImageSourcePolicy(max_bytes=1, timeout_s=5, max_pixels=1, host_allowlist=frozenset({"127.0.0.1"}))

            def make(hostname, token):
                return ImageFetcher(policy, http, LabelStudioCredentials(hostname, token, http, "test"))

            instances, _ = table()
            instances.make = None
            a = instances.setup("1.5", a_url, "ta")
            b = instances.setup("1.5", b_url, "tb")
            a.fetcher, b.fetcher = make(a_url, "ta"), make(b_url, "tb")
            candidates = instances.lookup("1.5")
            same = {"id": 2, "data": {"image": "/same/for/both.png"}}  # alone it cannot tell them apart
            found_b = await owner_of(candidates, [same, {"id": 1, "data": {"image": "/data/upload/1/bbb-img.png"}}],
                                     "image", "1")
            found_a = await owner_of(candidates, [same, {"id": 1, "data": {"image": "/data/upload/1/aaa-img.png"}}],
                                     "image", "1")
            nobody = await owner_of(candidates, [{"id": 1, "data": {"image": "/data/upload/1/zzz.png"}}], "image", "1")
            return found_a, found_b, nobody

    with loopback_http(instance_handler("ta", "/data/upload/1/aaa-img.png")) as a_url, \
            loopback_http(instance_handler("tb", "/data/upload/1/bbb-img.png")) as b_url:
        found_a, found_b, nobody = asyncio.run(scenario(a_url, b_url))
        a_port, b_port = int(a_url.rsplit(":", 1)[1]), int(b_url.rsplit(":", 1)[1])
    assert found_a.origin.endswith(f":{a_port}") and found_b.origin.endswith(f":{b_port}") and nobody is None
    assert {auth for port, auth in seen if port == a_port} == {"Token ta"}
    assert {auth for port, auth in seen if port == b_port} == {"Token tb"}


def test_the_operators_key_goes_only_to_its_own_instance():
    env = {"LABEL_STUDIO_API_KEY": "operator-key"}
    operator = "http://ls:8080"
    assert choose_credential(label_studio_url=operator, setup_hostname="", setup_token="",
                             env=env) == (operator, "operator-key", "LABEL_STUDIO_API_KEY")
    assert choose_credential(label_studio_url=operator, setup_hostname="http://ls:8080/", setup_token="legacy",
                             env=env)[:2] == (operator, "operator-key")
    # another instance: its own /setup token, to its own host; never the operator's key
    assert choose_credential(label_studio_url=operator, setup_hostname="http://other:8082", setup_token="tb",
                             env=env)[:2] == ("http://other:8082", "tb")
    assert choose_credential(label_studio_url=operator, setup_hostname="http://other:8082", setup_token="",
                             env=env) is None
    assert choose_credential(label_studio_url=operator, setup_hostname="https://ls:8080", setup_token="",
                             env=env) is None  # another scheme is another origin


def test_claims_of_two_instances_with_the_same_project_and_task_ids_do_not_collide():
    settings = Settings.load(env={}, args={"predict_deadline_s": 0.01})

    class Pipeline:
        model_version = "v"

        async def label_task_outcome(self, request, task):
            await asyncio.Event().wait()  # blocked for good: the claims stay held
            return TaskOutcome({"result": [], "score": 0})

    parser = LabellingPipeline(settings=settings, model_version="v", detect=None, segment=None, fetcher=None)
    body = {"tasks": [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in (1, 2)],
            "project": "1.1795641121", "label_config": SEED_CONFIG, "params": {"context": None}}

    class Writer:  # never reached: the tasks stay blocked, their claims held
        def describe(self):
            return "a writer"

    async def scenario(instance_b):
        board = JobBoard(pipeline=Pipeline(), settings=settings)
        await board.predict(parser.parse(body), Writer(), instance="http://127.0.0.1:8080")
        return await board.predict(parser.parse(body), Writer(), instance=instance_b)

    b = asyncio.run(scenario("http://127.0.0.1:8082"))
    # B's tasks were not "being predicted by" A's job: each instance computes its own
    assert not any("being predicted" in w for w in b.get("warnings", [])) and b["job"]["pending"] == 2
    same = asyncio.run(scenario("http://127.0.0.1:8080"))  # the same instance clicking again: claimed
    assert any("2 of these tasks are being predicted" in w for w in same["warnings"])


def test_get_jobs_can_be_narrowed_to_one_instance_and_project():
    settings = Settings.load(env={}, args={"predict_deadline_s": 0.01})

    class Pipeline:
        model_version = "v"

        async def label_task_outcome(self, request, task):
            await asyncio.Event().wait()
            return TaskOutcome({"result": [], "score": 0})

    class Writer:
        def describe(self):
            return "a writer"

    parser = LabellingPipeline(settings=settings, model_version="v", detect=None, segment=None, fetcher=None)

    def body(project):
        return {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/1.png"}}], "project": project,
                "label_config": SEED_CONFIG, "params": {"context": None}}

    async def scenario():
        board = JobBoard(pipeline=Pipeline(), settings=settings)
        for instance, project in (("http://a:8080", "1.100"), ("http://b:8080", "1.200"), ("http://a:8080", "2.100")):
            await board.predict(parser.parse(body(project)), Writer(), instance=instance)
        return ([len(board.summaries()), len(board.summaries(instance="http://a:8080")),
                 len(board.summaries(instance="http://a:8080/", project="1.100")), len(board.summaries(project="1"))])

    assert asyncio.run(scenario()) == [3, 2, 1, 2]
