"""Every setting of the service, read once from the environment and the Serve config's `args`.

Precedence: a non-null value in `configs/serve.yaml` `applications[].args` wins over the
environment, which wins over the defaults here. Values are validated at start-up so a typo
fails `serve run` with a clear message instead of failing requests later.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping
from urllib.parse import urlsplit

from serve_app.gpu_placement import fraction_problem
from serve_app.models.catalog import DEFAULT_DETECTOR, OFFICIAL_CHECKPOINTS
from serve_app.unit_interval import unit_interval

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


# Names the Label Studio ML backend examples use for the same setting.
_ENV_ALIASES = {"label_studio_url": ("LABEL_STUDIO_HOST",), "detector_model": ("GROUNDING_DINO_MODEL",)}
_ARG_ALIASES = {"grounding_dino_model": "detector_model"}  # the seed's names keep working


# The operator's Label Studio key: a secret, so read from the environment only, never from Serve config args.
KEY_VARIABLES = ("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN")


class SettingsError(ValueError):
    pass


MAX_TIMEOUT_S = 86_400.0  # a timeout or deadline beyond a day is a typo, and asyncio misbehaves near infinity
MAX_RESOURCE = 1_024  # CPUs or GPUs of one replica


PIPELINES = ("auto", "detect", "detect+segment", "concept")
# VIDEO_TRACK_FPS=0: a full-size detector takes about 10 s a frame on 2 CPU cores, tens of ms batched on a GPU
AUTO_TRACK_FPS = {"gpu": 10.0, "cpu": 2.0}


def environment_key(env: Mapping[str, str]) -> tuple[str, str]:
    """(key, variable name) of the operator's Label Studio key, or ("", "")."""
    for name in KEY_VARIABLES:
        if env.get(name):
            return env[name], name
    return "", ""


@dataclass(frozen=True)
class ModelSettings:
    """Which models run and how: checkpoints, the pipeline, precision, device, detection defaults (a project can
    override the thresholds in its label config)."""

    # DETECTOR_MODEL (alias GROUNDING_DINO_MODEL): hub id or local directory of a Grounding DINO family checkpoint
    detector_model: str = DEFAULT_DETECTOR
    # SEGMENTER_MODEL: masks from this model: a hub id or directory of a transformers SAM 2 / 2.1, SAM-HQ, EdgeTAM
    # or SAM checkpoint, or a segment-anything .pth path or URL. Empty: USE_SAM / USE_MOBILE_SAM decide
    segmenter_model: str = ""
    use_sam: bool = False  # USE_SAM: add brush masks from SAM
    # PIPELINE: detect (boxes), detect+segment (boxes, then masks from the segmenter), concept (SAM 3 as
    # DETECTOR_MODEL: boxes and masks from one model), or auto: concept for a SAM 3 detector, else detect+segment
    # when a segmenter is set, else detect
    pipeline: str = "auto"
    use_mobile_sam: bool = False  # USE_MOBILE_SAM: use MobileSAM (vit_t) instead of SAM
    sam_checkpoint: str = OFFICIAL_CHECKPOINTS["vit_h"]  # SAM_CHECKPOINT: path or http(s) URL
    mobilesam_checkpoint: str = OFFICIAL_CHECKPOINTS["vit_t"]  # MOBILESAM_CHECKPOINT: path or http(s) URL
    sam_checkpoint_sha256: str = ""  # SAM_CHECKPOINT_SHA256: optional check of the file
    mobilesam_checkpoint_sha256: str = ""  # MOBILESAM_CHECKPOINT_SHA256
    checkpoint_cache_dir: str = ""  # CHECKPOINT_CACHE_DIR: where URL checkpoints are kept (~/.cache/grounded-serve)
    precision: str = "fp32"  # PRECISION: fp32; fp16/bf16 autocast on GPU; bf16 on CPUs with AMX/AVX-512 BF16
    # COMPILE_ENCODERS: off; on (torch.compile the segmenter's or SAM 3's image encoder before serving); cudagraphs
    # (also CUDA graphs, on a GPU)
    compile_encoders: str = "off"
    sam_embedding_cache_bytes: int = 1 << 30  # SAM_EMBEDDING_CACHE_BYTES: per segmenter replica (4 MiB/image)
    sam_model_type: str = "auto"  # SAM_MODEL_TYPE: vit_h, vit_l, vit_b, tiny or auto (from the checkpoint)
    device: str = "auto"  # DEVICE: auto (cuda if the replica has a GPU), cpu, cuda
    model_version: str = ""  # MODEL_VERSION: overrides the version derived from the model names
    box_threshold: float = 0.30  # BOX_THRESHOLD
    text_threshold: float = 0.25  # TEXT_THRESHOLD
    # EXEMPLAR_THRESHOLD: the score a detection found by exemplar boxes needs (a phrase's text keeps BOX_THRESHOLD):
    # image-conditioned scores are on another scale than text ones (OWLv2)
    exemplar_threshold: float = 0.30
    polygon_tolerance_px: float = 1.0  # POLYGON_TOLERANCE_PX: contour simplification (Douglas-Peucker)
    # EXEMPLAR_CONTROL: the RectangleLabels whose boxes are exemplar prompts ("find every object like this")
    exemplar_control: str = "exemplar"

    @property
    def sam_enabled(self) -> bool:
        return self.use_sam or self.use_mobile_sam or bool(self.segmenter_model)

    @property
    def segmenter_checkpoint(self) -> str:
        if self.segmenter_model:
            return self.segmenter_model
        return self.mobilesam_checkpoint if self.use_mobile_sam else self.sam_checkpoint

    @property
    def segmenter_model_type(self) -> str:
        return "vit_t" if self.use_mobile_sam else self.sam_model_type

    @property
    def segmenter_checkpoint_setting(self) -> str:
        if self.segmenter_model:
            return "SEGMENTER_MODEL"
        return "MOBILESAM_CHECKPOINT" if self.use_mobile_sam else "SAM_CHECKPOINT"

    @property
    def segmenter_checkpoint_sha256(self) -> str:
        return self.mobilesam_checkpoint_sha256 if self.use_mobile_sam else self.sam_checkpoint_sha256


@dataclass(frozen=True)
class LabelStudioSettings:
    """Which Label Studio instances the service talks to, and where task images may come from."""

    label_studio_url: str = ""  # LABEL_STUDIO_URL (or LABEL_STUDIO_HOST): base for /data/... task URLs
    image_host_allowlist: str = ""  # IMAGE_HOST_ALLOWLIST: comma-separated hosts (or host:port) that may be private
    # MAX_LABEL_STUDIO_PROJECTS: projects (of any Label Studio instance) whose /setup host and token are kept
    max_label_studio_projects: int = 1_000
    # LABEL_STUDIO_PROJECT_TTL_S: a project's /setup is forgotten this long after its last request (a week)
    label_studio_project_ttl_s: float = 7 * 86_400.0
    local_files_document_root: str = ""  # LOCAL_FILES_DOCUMENT_ROOT: read /data/local-files/?d= from this disk


@dataclass(frozen=True)
class LimitSettings:
    """Bounds on the work one request can cause: every cap answers with a clear error beyond it."""

    max_tasks_per_request: int = 100_000  # MAX_TASKS_PER_REQUEST: tasks in one /predict (413 above)
    task_concurrency: int = 32  # TASK_CONCURRENCY: tasks in flight at once while a /predict waits for them
    predict_deadline_s: float = 30.0  # PREDICT_DEADLINE_S: a batch /predict answers by then; the rest go on in the background
    max_detections: int = 50  # MAX_DETECTIONS: boxes kept per task
    max_prompt_chars: int = 2_000  # MAX_PROMPT_CHARS
    max_phrases: int = 32  # MAX_PHRASES: phrases per prompt
    max_exemplars: int = 32  # MAX_EXEMPLARS: exemplar boxes in one interactive request
    max_context_items: int = 1_000  # MAX_CONTEXT_ITEMS: regions, clicks and numbers in params.context.result
    max_request_bytes: int = 256 * 1024 * 1024  # MAX_REQUEST_BYTES: a /predict, /setup or /webhook body (413 above)
    max_image_pixels: int = 40_000_000  # MAX_IMAGE_PIXELS: width x height after decoding
    ingress_image_memory_bytes: int = 2 << 30  # INGRESS_IMAGE_MEMORY_BYTES: decoded images + masks per ingress replica
    max_download_bytes: int = 50 * 1024 * 1024  # MAX_DOWNLOAD_BYTES
    download_timeout_s: float = 20.0  # DOWNLOAD_TIMEOUT_S: whole download, connect included
    task_timeout_s: float = 90.0  # TASK_TIMEOUT_S: one task end to end (Label Studio gives /predict 100 s)
    replica_retry_timeout_s: float = 30.0  # REPLICA_RETRY_TIMEOUT_S: wait for a running replica, then 503


@dataclass(frozen=True)
class JobSettings:
    """Background jobs: the tasks a batch /predict leaves running, and how their predictions are stored."""

    background_task_concurrency: int = 0  # BACKGROUND_TASK_CONCURRENCY: tasks in flight for background jobs alone (0: auto)
    max_background_tasks: int = 100_000  # MAX_BACKGROUND_TASKS: tasks queued for jobs at once (ids and image URLs)
    max_queued_bytes: int = 256 * 1024 * 1024  # MAX_QUEUED_BYTES: image values (URLs, data: URLs) queued tasks keep
    max_pending_writes: int = 64  # MAX_PENDING_WRITES: finished predictions waiting to be stored before jobs pause
    write_deadline_s: float = 300.0  # WRITE_DEADLINE_S: storing one batch of predictions, retries and waits included
    write_batch_tasks: int = 50  # WRITE_BATCH_TASKS: predictions stored by one bulk import call (at most 500)
    write_batch_bytes: int = 8 * 1024 * 1024  # WRITE_BATCH_BYTES: JSON of one bulk import call, roughly
    write_batch_wait_s: float = 2.0  # WRITE_BATCH_WAIT_S: how long a batch waits to fill while its job computes
    job_write_failure_limit: int = 20  # JOB_WRITE_FAILURE_LIMIT: failed writes in a row that stop a job


@dataclass(frozen=True)
class VideoSettings:
    """Video tasks (docs/video.md): how densely they are tracked and what one video may cost."""

    # VIDEO_TRACK_FPS: frames of each video second the detector searches (0: auto, 10 on GPU and 2 on CPU); never
    # more than the editor's <Video framerate>
    video_track_fps: float = 0.0
    max_video_seconds: float = 3_600.0  # MAX_VIDEO_SECONDS: longer videos are refused (413) before decoding
    max_video_pixels: int = 3840 * 2160  # MAX_VIDEO_PIXELS: width x height of a frame (4K; 8K is refused)
    max_video_frames: int = 250_000  # MAX_VIDEO_FRAMES: frames decoded from one video, whatever its header says
    max_video_bytes: int = 2 << 30  # MAX_VIDEO_BYTES: one video file, streamed to disk, never whole in memory
    video_download_timeout_s: float = 600.0  # VIDEO_DOWNLOAD_TIMEOUT_S: a whole video download
    video_task_timeout_s: float = 3_600.0  # VIDEO_TASK_TIMEOUT_S: one video task end to end (TASK_TIMEOUT_S's role)
    video_frames_in_flight: int = 8  # VIDEO_FRAMES_IN_FLIGHT: a video's frames at the detector at once (memory)
    # VIDEO_TASK_CONCURRENCY: videos labelled at once per ingress replica; each keeps its file on local disk (up to
    # MAX_VIDEO_BYTES), so this bounds the disk too; more video tasks wait their turn
    video_task_concurrency: int = 4
    # VIDEO_KEYFRAME_TOLERANCE: percent of the frame a track may depart from the editor's interpolation between
    # two keyframes before another keyframe is emitted
    video_keyframe_tolerance: float = 0.5
    # TRACKER_MODEL: `detect+track` on videos: a SAM 2.1 or EdgeTAM video checkpoint (hub id or directory) carries each
    # detected object through the frames; empty: the detector's boxes are linked by ByteTrack (`detect+link`)
    tracker_model: str = ""
    tracker_max_objects: int = 32  # TRACKER_MAX_OBJECTS: objects one video tracks at once (work per frame)
    tracker_max_sessions: int = 8  # TRACKER_MAX_SESSIONS: videos one Tracker replica holds at once (memory)
    tracker_session_idle_s: float = 300.0  # TRACKER_SESSION_IDLE_S: a session not stepped this long may be dropped
    tracker_lost_after_s: float = 2.0  # TRACKER_LOST_AFTER_S: an object unseen this long (video time) has left
    # VIDEO_BOX_TRACK_S: a box drawn in the editor is tracked this many seconds of video forward and as many back,
    # within the editor's TASK_TIMEOUT_S
    video_box_track_s: float = 5.0


@dataclass(frozen=True)
class PerformanceSettings:
    """Resources and tuning: set here rather than in ray_actor_options, so one config runs on CPU-only and GPU
    clusters."""

    accelerator: str = "auto"  # ACCELERATOR: auto (GPU fractions if the cluster has GPUs at deploy time), gpu, cpu
    detector_cpus: float = 0.5  # DETECTOR_CPUS: logical CPUs per detector replica
    # DETECTOR_GPUS: GPU fraction per detector replica, when GPUs are used. auto (None): an equal share of one GPU
    # among the graph's model roles, two at least (serve_app.gpu_placement): 0.5 with a segmenter, 1/3 each with a
    # tracker too, so one GPU always holds one replica of each
    detector_gpus: float | None = None
    segmenter_cpus: float = 0.4  # SEGMENTER_CPUS
    segmenter_gpus: float | None = None  # SEGMENTER_GPUS (auto as DETECTOR_GPUS)
    tracker_cpus: float = 0.4  # TRACKER_CPUS
    tracker_gpus: float | None = None  # TRACKER_GPUS (auto as DETECTOR_GPUS)
    model_cpu_niceness: int = 5  # MODEL_CPU_NICENESS: nice value added to model replicas that run on CPU (0 = off)
    # MODEL_MALLOC_REUSE: model replicas keep the memory a forward pass freed for the next one (glibc tunables,
    # serve_app.deployments.replica_memory) instead of faulting it in afresh each pass; trimmed once the replica is idle
    model_malloc_reuse: bool = True
    cpu_replicas_per_node: int = 1  # CPU_REPLICAS_PER_NODE: replicas of one model per node when on CPU (0 = no limit)
    ingress_cpu_threads: int = 2  # INGRESS_CPU_THREADS: threads per ingress replica for image decoding and RLE


@dataclass(frozen=True)
class Settings(ModelSettings, LabelStudioSettings, LimitSettings, JobSettings, VideoSettings, PerformanceSettings):
    """Every setting, grouped by concern; the environment names are the fields' names in capitals."""

    def with_defaults_for(self, *, gpus: bool) -> "Settings":
        """Settings whose `auto` values are decided for the cluster the app is built on."""
        decided: dict[str, Any] = {}
        if not self.background_task_concurrency:
            # On CPU the models and the ingress share a few cores with the editor's clicks: measured on 2 cores,
            # 2 background tasks kept clicks at p50 0.24 s (8: 0.83 s) for 20 % less job throughput. A GPU batches
            # them, and a click waits for one short GPU batch at most.
            decided["background_task_concurrency"] = 16 if gpus else 2
        if not self.video_track_fps:
            decided["video_track_fps"] = AUTO_TRACK_FPS["gpu" if gpus else "cpu"]
        return replace(self, **decided) if decided else self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        args = {_ARG_ALIASES.get(name, name): value for name, value in (args or {}).items()}
        unknown = set(args) - {f.name for f in fields(cls)}
        if unknown:
            raise SettingsError(f"unknown setting(s) in the Serve config args: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = args.get(f.name)
            source = f"args.{f.name}"
            names = [name for name in (f.name.upper(), *_ENV_ALIASES.get(f.name, ())) if env.get(name, "") != ""]
            if f.name == "detector_model" and len({env[name] for name in names}) > 1:  # which one was meant?
                raise SettingsError(f"{' and '.join(names)} are both set, to different values: set one of them")
            if raw is None and names:
                raw, source = env[names[0]], names[0]
            if raw is None:
                continue
            values[f.name] = _parse(f.name, f.type, raw, source)
        settings = cls(**values)
        settings._validate()
        settings.check_key_destination(env)
        return settings

    def check_key_destination(self, env: Mapping[str, str]) -> None:
        """A Label Studio key goes only to LABEL_STUDIO_URL; without it, a /setup from anyone could redirect it."""
        _, variable = environment_key(env)
        if variable and not self.label_studio_url:
            raise SettingsError(f"{variable} is set but LABEL_STUDIO_URL is not: the key is only ever sent to "
                                f"LABEL_STUDIO_URL, so set both (or unset {variable})")

    def _validate(self) -> None:
        for name in ("box_threshold", "text_threshold", "exemplar_threshold"):
            try:
                unit_interval(getattr(self, name), name.upper())
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
        if not 0 <= self.video_track_fps <= 1_000:
            raise SettingsError(f"VIDEO_TRACK_FPS must be 0 (auto) to 1000, got {self.video_track_fps}")
        if not 0 <= self.video_keyframe_tolerance <= 100:
            raise SettingsError(f"VIDEO_KEYFRAME_TOLERANCE must be 0 to 100 (percent), got {self.video_keyframe_tolerance}")
        if self.background_task_concurrency < 0:
            raise SettingsError("BACKGROUND_TASK_CONCURRENCY must be 0 (auto) or a positive integer")
        for name in ("max_tasks_per_request", "task_concurrency", "max_background_tasks", "max_queued_bytes",
                     "max_pending_writes", "job_write_failure_limit", "max_label_studio_projects", "write_batch_tasks",
                     "write_batch_bytes",
                     "ingress_cpu_threads", "max_detections",
                     "max_prompt_chars", "max_phrases", "max_exemplars", "max_context_items", "max_request_bytes", "max_image_pixels", "ingress_image_memory_bytes",
                     "max_download_bytes", "max_video_pixels", "max_video_frames", "max_video_bytes",
                     "video_frames_in_flight", "video_task_concurrency", "tracker_max_objects",
                     "tracker_max_sessions"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name.upper()} must be a positive integer, got {getattr(self, name)}")
        if self.cpu_replicas_per_node < 0:
            raise SettingsError(f"CPU_REPLICAS_PER_NODE must be 0 (no limit) or a positive integer, "
                                f"got {self.cpu_replicas_per_node}")
        if not 0 <= self.model_cpu_niceness <= 19:
            raise SettingsError(f"MODEL_CPU_NICENESS must be 0 to 19, got {self.model_cpu_niceness}")
        if self.sam_embedding_cache_bytes < 0 or self.polygon_tolerance_px < 0:
            raise SettingsError("SAM_EMBEDDING_CACHE_BYTES and POLYGON_TOLERANCE_PX must not be negative")
        for name in ("download_timeout_s", "task_timeout_s", "replica_retry_timeout_s", "predict_deadline_s",
                     "write_deadline_s", "write_batch_wait_s", "max_video_seconds", "video_download_timeout_s",
                     "video_task_timeout_s", "tracker_session_idle_s", "tracker_lost_after_s", "video_box_track_s"):
            if not 0 < getattr(self, name) <= MAX_TIMEOUT_S:
                raise SettingsError(f"{name.upper()} must be more than 0 and at most {MAX_TIMEOUT_S:g} s (a day), "
                                    f"got {getattr(self, name)}")
        if self.write_batch_tasks > 500:  # Label Studio imports in batches of 500: beyond, not all or nothing
            raise SettingsError(f"WRITE_BATCH_TASKS must be 1 to 500, got {self.write_batch_tasks}")
        if not 0 < self.label_studio_project_ttl_s <= 365 * 86_400:
            raise SettingsError(f"LABEL_STUDIO_PROJECT_TTL_S must be more than 0 and at most a year, "
                                f"got {self.label_studio_project_ttl_s}")
        if self.segmenter_model and self.use_mobile_sam:
            raise SettingsError("USE_MOBILE_SAM=true and SEGMENTER_MODEL are both set: SEGMENTER_MODEL names the "
                                "segmenter (MobileSAM too, as a .pth path or URL); unset one of them")
        if self.pipeline not in PIPELINES:
            raise SettingsError(f"PIPELINE must be one of {', '.join(PIPELINES)}, got {self.pipeline!r}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise SettingsError(f"PRECISION must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.compile_encoders not in ("off", "on", "cudagraphs"):
            raise SettingsError(f"COMPILE_ENCODERS must be off, on or cudagraphs, got {self.compile_encoders!r}")
        if self.accelerator not in ("auto", "gpu", "cpu"):
            raise SettingsError(f"ACCELERATOR must be auto, gpu or cpu, got {self.accelerator!r}")
        for name in ("detector_cpus", "detector_gpus", "segmenter_cpus", "segmenter_gpus", "tracker_cpus",
                     "tracker_gpus"):
            value = getattr(self, name)
            if value is None:  # auto
                continue
            if not 0 <= value <= MAX_RESOURCE:
                raise SettingsError(f"{name.upper()} must be 0 to {MAX_RESOURCE}, got {value}")
            if name.endswith("_gpus") and fraction_problem(name.upper(), value):
                raise SettingsError(fraction_problem(name.upper(), value))
        if self.label_studio_url:
            problem = url_problem(self.label_studio_url)
            if problem:
                raise SettingsError(f"LABEL_STUDIO_URL={self.label_studio_url!r}: {problem}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise SettingsError(f"DEVICE must be auto, cpu or cuda[:N], got {self.device!r}")


def url_problem(url: str) -> str:
    """Why `url` cannot be a Label Studio base URL, or "" when it can."""
    if not url.startswith(("http://", "https://")):
        return "must start with http:// or https://"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when out of range
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if not parts.hostname:
        return "has no host"
    return ""


def _parse(name: str, type_name: Any, raw: Any, source: str) -> Any:
    type_name = type_name if isinstance(type_name, str) else type_name.__name__
    try:
        if type_name == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError("expected true/false")
        if type_name == "float | None" and str(raw).strip().lower() == "auto":
            return None
        if type_name in ("float", "float | None"):
            value = float(raw)
            if not math.isfinite(value):  # NaN, inf, and 1e999 (which float() turns into inf)
                raise ValueError("not a finite number")
            return value
        if type_name == "int":
            return int(str(raw).replace("_", ""))
        return str(raw).strip()
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{source}={raw!r} is not a valid {type_name} ({exc})") from None
