"""`grounded-serve check`: every setting, the pipeline plan and the checkpoints, before `serve run`.

`serve run` logs a refused configuration (a key without LABEL_STUDIO_URL, PIPELINE=concept with a Grounding DINO
checkpoint) and keeps running with no application, so a supervisor, a container health check or a person at the
terminal sees nothing wrong. The documented start commands run this first: it exits non-zero with the message.
It reads the same environment and the same Serve config `args` the application builder reads, and nothing is
loaded: a hub id is looked up in the local cache only (a miss is a note, unless HF_HUB_OFFLINE=1 makes it fatal).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from serve_app.models.checkpoints import is_checkpoint_file
from serve_app.graph_plan import choose_pipeline
from serve_app.settings import Settings, SettingsError

APP_IMPORT_PATH = "serve_app.app:build_app"
ANSWER_MARGIN_S = 5.0  # a batch answer needs a few seconds to travel after PREDICT_DEADLINE_S


class CheckFailed(RuntimeError):
    pass


def serve_config(path: str | None) -> tuple[dict[str, Any], float | None]:
    """(the application's args, http_options.request_timeout_s) of a Serve config file; ({}, None) without one."""
    if not path:
        return {}, None
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CheckFailed(f"cannot read the Serve config {path}: {exc}") from None
    apps = [app for app in config.get("applications") or [] if app.get("import_path") == APP_IMPORT_PATH]
    args = (apps[0].get("args") or {}) if apps else {}
    timeout = (config.get("http_options") or {}).get("request_timeout_s")
    return {k: v for k, v in args.items() if v is not None}, float(timeout) if timeout is not None else None


def run_check(config_path: str | None, env: Mapping[str, str] | None = None) -> list[str]:
    """What the service would run, line by line; CheckFailed with every problem found."""
    env = os.environ if env is None else env
    args, request_timeout_s = serve_config(config_path)
    try:
        settings = Settings.load(args, env=env)
        pipeline = choose_pipeline(settings)
    except SettingsError as exc:
        raise CheckFailed(str(exc)) from None
    problems: list[str] = []
    lines = [f"pipeline: {pipeline}", f"detector: {settings.detector_model}"]
    problems += _model_problems("DETECTOR_MODEL", settings.detector_model, env, lines)
    if settings.sam_enabled and pipeline != "concept":
        lines.append(f"segmenter: {settings.segmenter_checkpoint}")
        problems += _model_problems(settings.segmenter_checkpoint_setting, settings.segmenter_checkpoint, env, lines)
    lines.append(f"video: {'detect+track' if settings.tracker_model else 'detect+link'}")
    if settings.tracker_model:
        lines.append(f"tracker: {settings.tracker_model}")
        problems += _model_problems("TRACKER_MODEL", settings.tracker_model, env, lines)
    if request_timeout_s is not None and settings.predict_deadline_s > request_timeout_s - ANSWER_MARGIN_S:
        problems.append(f"PREDICT_DEADLINE_S={settings.predict_deadline_s:g} leaves no time for the answer within "
                        f"Serve's request_timeout_s={request_timeout_s:g} ({config_path}): every batch /predict would "
                        f"time out; keep it at most {request_timeout_s - ANSWER_MARGIN_S:g}")
    if settings.predict_deadline_s > 100 - ANSWER_MARGIN_S:
        lines.append(f"note: PREDICT_DEADLINE_S={settings.predict_deadline_s:g} s is near or beyond Label Studio's "
                     "default ML_TIMEOUT_PREDICT (100 s): raise that too, or Label Studio hangs up first")
    lines.append("Label Studio: " + (f"{settings.label_studio_url} (operator's instance, with its key)"
                                     if settings.label_studio_url else "from each project's /setup"))
    if problems:
        raise CheckFailed("\n".join(problems))
    return lines


def _model_problems(setting: str, source: str, env: Mapping[str, str], lines: list[str]) -> list[str]:
    offline = env.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if source.startswith(("http://", "https://")):
        lines.append(f"  {setting} is a URL: downloaded once into CHECKPOINT_CACHE_DIR on the first start")
        return []
    path = Path(os.path.expanduser(source))
    if path.exists() or is_checkpoint_file(source) or source.startswith(("/", ".", "~")):
        if not path.exists():
            return [f"{setting}={source!r}: no such file or directory"]
        if path.is_dir() and not (path / "config.json").is_file():
            return [f"{setting}={source!r} is a directory without config.json (a transformers model directory?)"]
        return []
    # a hub id
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id: the hub client says why
        cached = None
    if isinstance(cached, str):
        lines.append(f"  {setting}: in the local Hugging Face cache")
        return []
    if offline:
        return [f"{setting}={source!r} is not in the Hugging Face cache and HF_HUB_OFFLINE=1: run "
                "`grounded-serve download` where the hub is reachable, or point it at a local directory"]
    lines.append(f"  {setting}: downloaded from the Hugging Face hub on the first start")
    return []
