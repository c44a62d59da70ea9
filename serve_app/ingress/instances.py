"""Several Label Studio instances on one service: each project's requests are fetched and written back through the
instance that sent its /setup.

Label Studio names a project `"<id>.<created-at timestamp>"` in every /setup and /predict, so two instances that
both have a project 1 send different names, unless both projects were created in the same second (two fresh
instances set up together). /setup also carries the instance's `hostname` and a token; the table below keeps, per
project name and instance origin, the fetcher built from them (its base URL for relative `/data/...` URLs, its
credential, its address rules), and /predict looks its project up.

When one name has several instances (a collision, or a /setup from somewhere else), the request says which one sent
it only through its tasks: the ingress asks each instance, with that instance's own token, for the request's first
task (`GET /api/tasks/{id}`), and the instance whose task holds the same image is the one (the operator's instance
first, so another host learns nothing when it matches). No credential goes anywhere but its own instance.

The operator's instance (LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY) is also the fallback for a project whose /setup
this replica has not seen (after a restart, before Label Studio's next /health and /setup; the editor's calls come
without one), or with no credential when there is none: today's behaviour, logged once per project. It is not in the
table, so no flood of /setup calls can evict it.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from urllib.parse import urlsplit
from typing import Any, Callable, Generic, TypeVar

from serve_app import get_logger
from serve_app.ingress.errors import BadRequest
from serve_app.ingress.origins import origin
from serve_app.settings import url_problem

logger = get_logger(__name__)

Fetcher = TypeVar("Fetcher")
CANDIDATES = 4  # instances kept for one project name (a collision is two)
VERIFY_TIMEOUT_S = 10.0


@dataclass
class Instance(Generic[Fetcher]):
    hostname: str  # as /setup sent it
    token: str
    fetcher: Fetcher
    last_seen: float

    @property
    def origin(self) -> str:
        """scheme://host:port: what GET /jobs shows, and what task claims are kept under (never the token)."""
        return origin_text(self.hostname)


def origin_text(url: str) -> str:
    if not url:
        return ""
    scheme, host, port = origin(url)
    return f"{scheme}://{host}:{port}"


def setup_fields(body: dict, hostname: str, token: str) -> tuple[str, str]:
    """The Label Studio host and token a /setup body leaves in force. Empty or missing fields keep the current
    ones (grounded-serve prelabel sends both empty); anything else is checked before any state changes."""
    new_hostname, new_token = body.get("hostname"), body.get("access_token")
    if new_hostname not in (None, ""):
        if not isinstance(new_hostname, str):
            raise BadRequest("'hostname' must be a string")
        problem = url_problem(new_hostname.strip())
        if problem:
            raise BadRequest(f"'hostname' {new_hostname[:200]!r} {problem}")
        hostname = new_hostname.strip().rstrip("/")
    if new_token not in (None, ""):
        if not isinstance(new_token, str):
            raise BadRequest("'access_token' must be a string")
        token = new_token
    return hostname, token


class LabelStudioInstances(Generic[Fetcher]):
    def __init__(self, make_fetcher: Callable[[str, str], Fetcher], *, capacity: int, ttl_s: float,
                 pinned_origin: str = "", clock: Callable[[], float] = time.monotonic):
        self._make_fetcher = make_fetcher  # (hostname, token) -> fetcher
        self.pinned_origin = pinned_origin  # the operator's instance: asked first when a name is shared
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        # project name -> {origin: instance}, the most recent /setup last; names in least recently used order
        self._projects: collections.OrderedDict[str, collections.OrderedDict[str, Instance[Fetcher]]] = \
            collections.OrderedDict()
        self._unknown_logged: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._projects)

    def known(self, project: str, hostname: str = "") -> Instance[Fetcher] | None:
        """What the last /setup for `project` (from `hostname`'s origin, if given) said, without counting as use."""
        candidates = self._projects.get(project)
        if not candidates:
            return None
        if hostname:
            return candidates.get(origin_text(hostname))
        return next(reversed(candidates.values()))

    def apply_setup(self, project: str, body: dict) -> None:
        """A /setup body: empty fields keep what the project's last /setup said, and a token is only ever taken
        from the same instance's /setup. grounded-serve prelabel sends neither: nothing to remember."""
        hostname, token = setup_fields(body, "", "")
        if not hostname:
            latest = self.known(project)
            hostname = latest.hostname if latest else ""
        if not token:
            same = self.known(project, hostname) if hostname else None
            token = same.token if same else ""
        if hostname or token:  # downloads in flight keep the fetcher they started with
            self.setup(project, hostname, token)

    def setup(self, project: str, hostname: str, token: str) -> Instance[Fetcher]:
        """Remember what a /setup for `project` said; a changed host or token gets a new fetcher."""
        now = self._clock()
        where = origin_text(hostname)
        candidates = self._projects.pop(project, collections.OrderedDict())
        known = candidates.pop(where, None)
        if known is None or (known.hostname, known.token) != (hostname, token):
            known = Instance(hostname, token, self._make_fetcher(hostname, token), now)
            if candidates:
                logger.warning("project %s is also a project of %s: its requests are matched to their Label Studio "
                               "instance by asking each for the request's first task", project or "-",
                               ", ".join(o or "-" for o in candidates))
        known.last_seen = now
        candidates[where] = known
        while len(candidates) > CANDIDATES:
            candidates.popitem(last=False)
        self._projects[project] = candidates
        self._expire(now)
        while len(self._projects) > self.capacity:
            evicted, _ = self._projects.popitem(last=False)
            logger.warning("forgetting project %s: more than %d projects (MAX_LABEL_STUDIO_PROJECTS); its next "
                           "/setup brings it back", evicted or "-", self.capacity)
        return known

    def lookup(self, project: str) -> list[Instance[Fetcher]]:
        """The instances that sent a /setup for `project`: the operator's first, then the most recent first."""
        now = self._clock()
        self._expire(now)
        candidates = self._projects.get(project)
        if not candidates:
            if project not in self._unknown_logged:
                self._unknown_logged[project] = None
                while len(self._unknown_logged) > self.capacity:
                    self._unknown_logged.popitem(last=False)
                logger.warning("project %s: no /setup seen for it since this replica started; its images are fetched "
                               "through LABEL_STUDIO_URL if set (else only public URLs), until Label Studio's next "
                               "/setup for it (opening the project or a Retrieve sends one)", project or "-")
            return []
        for instance in candidates.values():
            instance.last_seen = now
        self._projects.move_to_end(project)
        ordered = list(reversed(candidates.values()))
        return sorted(ordered, key=lambda instance: instance.origin != self.pinned_origin)  # stable: operator first

    async def sender(self, request: Any, *, operator: Fetcher, operator_url: str) -> Instance[Fetcher] | None:
        """The instance that sent a /predict (a LabellingRequest): the one whose /setup named its project, or, when
        several did (the same name on two instances), the one that holds its tasks. None: the operator's fetcher
        (`operator`, LABEL_STUDIO_URL's), for a project no /setup named, or one only another host's /setup named
        whose tasks the operator's own Label Studio holds (that /setup claimed a project not its own)."""
        candidates = self.lookup(request.project)
        if not candidates:
            return None
        project_id = request.project.split(".", 1)[0]
        image_key = request.config.image_key
        pinned = self.pinned_origin
        if len(candidates) == 1 and pinned and candidates[0].origin != pinned \
                and getattr(operator, "credentials", None) is not None:
            if await owner_of([Instance(operator_url, "", operator, 0.0)], request.tasks, image_key, project_id):
                logger.warning("project %s: a /setup from %s named it, but LABEL_STUDIO_URL holds its tasks: served "
                               "from there", request.project, candidates[0].origin)
                return None
            return candidates[0]
        if len(candidates) == 1:
            return candidates[0]
        owner = await owner_of(candidates, request.tasks, image_key, project_id)
        if owner is None:  # the operator's instance if it is one of them, else the most recent /setup's
            fallback = candidates[0] if candidates[0].origin == pinned else self.known(request.project)
            logger.warning("project %s: none of %s holds this request's tasks as sent; using %s", request.project,
                           ", ".join(c.origin for c in candidates), fallback.origin)
            return fallback
        return owner

    def _expire(self, now: float) -> None:
        while self._projects:
            project, candidates = next(iter(self._projects.items()))
            if any(now - instance.last_seen <= self.ttl_s for instance in candidates.values()):
                return
            del self._projects[project]


SAMPLE = 20  # tasks of a request compared with each candidate instance: the first and the last ten


async def owner_of(candidates: list[Instance], tasks: list[Any], image_key: str, project_id: str) -> Instance | None:
    """Which of `candidates` sent `tasks`: the first whose own API, asked with its own credential, holds every
    sampled task (by id, in that project) with the same image. None when none can say (no ids, no credential, no
    match). Two instances that both hold the same ids with the same images cannot be told apart: the first wins.

    Asked through the project's export (`GET /api/projects/{id}/export?ids[]=...`), which has no side effect:
    `GET /api/tasks/{id}` would make Label Studio ask this service for a prediction of a task that has none."""
    wanted: dict[int, str] = {}
    for task in [*tasks[:SAMPLE // 2], *tasks[-(SAMPLE // 2):]]:
        task_id = task.get("id") if isinstance(task, dict) else None
        data = task.get("data") if isinstance(task, dict) else None
        if isinstance(task_id, int) and not isinstance(task_id, bool) and isinstance(data, dict) \
                and _path(data.get(image_key)):
            wanted[task_id] = _path(data.get(image_key))
    if not wanted or not project_id.isdigit():
        return None
    for instance in candidates:
        fetcher = instance.fetcher
        credentials = getattr(fetcher, "credentials", None)
        if credentials is None:
            continue
        try:
            url = f"{credentials.base_url}/api/projects/{project_id}/export"
            target, headers, extensions = await fetcher.connect_target(url)
            response = await credentials.client.get(
                target, params=[("exportType", "JSON"), ("download_all_tasks", "true"),
                                *(("ids[]", str(task_id)) for task_id in wanted)],
                headers={**headers, **await credentials.headers()}, extensions=extensions, timeout=VERIFY_TIMEOUT_S)
            rows = response.json() if response.status_code == 200 else []
            held = {row.get("id"): _path(row["data"].get(image_key)) for row in rows
                    if isinstance(row, dict) and isinstance(row.get("data"), dict)}
            if all(held.get(task_id) == path for task_id, path in wanted.items()):
                return instance
        except Exception:  # noqa: BLE001 - an instance that cannot answer is not the one
            logger.info("could not ask %s whether it sent tasks %s", instance.origin, list(wanted)[:3],
                        exc_info=True)
    return None


def _path(value: Any) -> str:
    """An image value as both sides write it: an export may make a relative upload URL absolute."""
    if not isinstance(value, str):
        return ""
    return urlsplit(value).path if value.startswith(("http://", "https://", "/")) else value
