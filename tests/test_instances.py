"""Several Label Studio instances on one service (issue 29), without Ray: the per-project table of /setup hosts and
tokens, its cap and expiry, the operator's instance, and that the job board keeps claims apart per instance."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.ingress.errors import BadRequest
from serve_app.ingress.instances import LabelStudioInstances, origin_text
from serve_app.ingress.jobs import JobBoard
from serve_app.ingress.label_studio_auth import choose_credential
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
    assert instances.lookup("1.1795641121").fetcher[1:3] == ("http://127.0.0.1:8080", "token-a")
    assert instances.lookup("1.1795641999").fetcher[1:3] == ("http://127.0.0.1:8082", "token-b")
    assert a.origin == "http://127.0.0.1:8080" and b.origin == "http://127.0.0.1:8082"
    assert instances.lookup("1.1") is None  # never set up: the caller falls back to the operator's instance


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
    assert len(instances) == 3
    assert instances.lookup("999.1") is not None and instances.lookup("0.1") is None
    clock.now = 50
    instances.lookup("998.1")  # used: stays
    clock.now = 120
    assert instances.lookup("998.1") is not None and instances.lookup("999.1") is None  # expired after 100 s unused


def test_a_project_of_the_operators_instance_cannot_be_moved_to_another_host():
    instances, _ = table(pinned_origin=origin_text("http://ls:8080"))
    instances.setup("1.17", "http://ls:8080/", "t")
    with pytest.raises(BadRequest) as refused:
        instances.setup("1.17", "http://attacker.example", "x")
    assert refused.value.status_code == 409 and "LABEL_STUDIO_URL" in str(refused.value)
    assert instances.lookup("1.17").hostname == "http://ls:8080/"
    instances.setup("2.17", "http://other.example", "x")  # another instance's project: fine
    instances.setup("2.17", "http://ls:8080", "t")  # and a project may always move to the operator's


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
