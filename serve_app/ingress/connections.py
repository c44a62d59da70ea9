"""How the ingress reaches one Label Studio instance: the fetcher for its images and the writer for its
predictions, with the credential issued for it and the outbound-address rules (serve_app.ingress.outbound)."""

from __future__ import annotations

import functools
import os

import httpx

from serve_app import get_logger
from serve_app.ingress.errors import BadRequest
from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy
from serve_app.ingress.origins import origin
from serve_app.label_studio.credentials import LabelStudioCredentials, choose_credential
from serve_app.label_studio.prediction_writer import PredictionWriter
from serve_app.settings import Settings

logger = get_logger(__name__)


def fetcher_for(settings: Settings, http: httpx.AsyncClient, setup_hostname: str, setup_token: str) -> ImageFetcher:
    """The fetcher of one Label Studio instance: the operator's (LABEL_STUDIO_URL) when /setup named its origin or
    no host, else the /setup host with its own token, which must be public or in IMAGE_HOST_ALLOWLIST."""
    s = settings
    chosen = choose_credential(label_studio_url=s.label_studio_url, setup_hostname=setup_hostname,
                               setup_token=setup_token, env=os.environ)
    operators = bool(s.label_studio_url) and (not setup_hostname or
                                              origin(setup_hostname) == origin(s.label_studio_url))
    policy = ImageSourcePolicy(
        max_bytes=s.max_download_bytes, timeout_s=s.download_timeout_s, max_pixels=s.max_image_pixels,
        label_studio_url=s.label_studio_url if operators else setup_hostname, trust_label_studio_host=operators,
        document_root=s.local_files_document_root,
        host_allowlist=frozenset(h.strip().lower() for h in s.image_host_allowlist.split(",") if h.strip()),
    )
    # Secrets come from the replica's environment (or Label Studio's /setup), never from Serve config args,
    # and each goes only to the origin it was issued for.
    credentials = LabelStudioCredentials(chosen[0], chosen[1], http, chosen[2]) if chosen else None
    return ImageFetcher(policy, http, credentials)


async def writer_for(fetcher: ImageFetcher) -> PredictionWriter | None:
    """Where background jobs store predictions: the same Label Studio and credential as the request's downloads,
    reached under the same address rules (a /setup host must be public or in IMAGE_HOST_ALLOWLIST)."""
    if fetcher.credentials is None:
        return None
    route = functools.partial(fetcher.outbound.connect_target, what="Label Studio host")
    try:
        await route(fetcher.credentials.base_url)
    except BadRequest as exc:
        logger.warning("background jobs cannot store predictions in %s: %s", fetcher.credentials.base_url, exc)
        return None
    return PredictionWriter(fetcher.credentials, route=route)
