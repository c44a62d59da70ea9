"""Several Label Studio instances on one service: each project's requests are fetched and written back through the
instance that sent its /setup.

Label Studio names a project `"<id>.<created-at timestamp>"` in every /setup and /predict, so two fresh instances
that both have a project 1 still send different names (unless both were created in the same second). /setup also
carries the instance's `hostname` and a token; the table below keeps, per project name, the fetcher built from
them (its Label Studio base URL for relative `/data/...` URLs, its credential, its address rules), and /predict
looks its project up. The operator's instance (LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY) is not in the table: it
is the fallback, so no flood of /setup calls can evict it.

A /predict for a project whose /setup this replica has not seen (after a restart, before Label Studio's next /health
and /setup; the editor's calls come without one) is served by the operator's instance, or with no credential when
there is none: today's behaviour, logged once per project.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from serve_app import get_logger
from serve_app.ingress.errors import BadRequest
from serve_app.ingress.origins import origin

logger = get_logger(__name__)

Fetcher = TypeVar("Fetcher")


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


class LabelStudioInstances(Generic[Fetcher]):
    def __init__(self, make_fetcher: Callable[[str, str], Fetcher], *, capacity: int, ttl_s: float,
                 pinned_origin: str = "", clock: Callable[[], float] = time.monotonic):
        self._make_fetcher = make_fetcher  # (hostname, token) -> fetcher
        self.pinned_origin = pinned_origin  # the operator's instance: its projects never move to another host
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        self._projects: collections.OrderedDict[str, Instance[Fetcher]] = collections.OrderedDict()
        self._unknown_logged: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._projects)

    def known(self, project: str) -> Instance[Fetcher] | None:
        """What the last /setup for `project` said (without counting as use)."""
        return self._projects.get(project)

    def setup(self, project: str, hostname: str, token: str) -> Instance[Fetcher]:
        """Remember what a /setup for `project` said; a changed host or token gets a new fetcher. BadRequest (409) for
        a /setup that would move a project of the operator's instance (LABEL_STUDIO_URL) to another host: whoever
        knows a project's name must not be able to take its images and predictions elsewhere."""
        now = self._clock()
        known = self._projects.get(project)
        if (known is not None and self.pinned_origin and known.origin == self.pinned_origin
                and origin_text(hostname) not in ("", self.pinned_origin)):
            raise BadRequest(f"project {project[:64]!r} belongs to the Label Studio at LABEL_STUDIO_URL "
                             f"({self.pinned_origin}); a /setup from {origin_text(hostname)} cannot move it",
                             status_code=409)
        self._projects.pop(project, None)
        if known is None or (known.hostname, known.token) != (hostname, token):
            if known is not None and known.origin != origin_text(hostname):
                logger.warning("project %s moved from %s to %s (a /setup from another Label Studio instance with "
                               "the same project name?)", project or "-", known.origin or "-",
                               origin_text(hostname) or "-")
            known = Instance(hostname, token, self._make_fetcher(hostname, token), now)
        known.last_seen = now
        self._projects[project] = known
        self._expire(now)
        while len(self._projects) > self.capacity:
            evicted, instance = self._projects.popitem(last=False)
            logger.warning("forgetting project %s of %s: more than %d projects (MAX_LABEL_STUDIO_PROJECTS); its next "
                           "/setup brings it back", evicted or "-", instance.origin or "-", self.capacity)
        return known

    def lookup(self, project: str) -> Instance[Fetcher] | None:
        now = self._clock()
        self._expire(now)
        instance = self._projects.get(project)
        if instance is None:
            if project not in self._unknown_logged:
                self._unknown_logged[project] = None
                while len(self._unknown_logged) > self.capacity:
                    self._unknown_logged.popitem(last=False)
                logger.warning("project %s: no /setup seen for it since this replica started; its images are fetched "
                               "through LABEL_STUDIO_URL if set (else only public URLs), until Label Studio's next "
                               "/setup for it (opening the project or a Retrieve sends one)", project or "-")
            return None
        instance.last_seen = now
        self._projects.move_to_end(project)
        return instance

    def _expire(self, now: float) -> None:
        while self._projects:
            project, oldest = next(iter(self._projects.items()))
            if now - oldest.last_seen <= self.ttl_s:
                return
            del self._projects[project]
