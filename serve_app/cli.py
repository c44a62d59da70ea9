"""`grounded-serve` command line: tools around the service."""

from __future__ import annotations

import argparse
import os
import sys

from serve_app.unit_interval import unit_interval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grounded-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser(
        "make-tiny-models",
        help="write tiny random-weight Grounding DINO and SAM models for offline demos and tests",
        description="Writes DIR/grounding-dino-tiny-random (a transformers model directory) and "
                    "DIR/sam-tiny-random.pth (a SAM state dict). Their outputs are random; they exist so the "
                    "service can run where no model hub is reachable. Prints the environment to use them.",
    )
    tiny.add_argument("dir", nargs="?", default="models/tiny", help="output directory (default: models/tiny)")
    tiny.add_argument("--seed", type=int, default=0)
    download = commands.add_parser(
        "download",
        help="fetch the configured checkpoints ahead of time (for offline clusters and faster starts)",
        description="Downloads what the service would load with the current environment: the Grounding DINO "
                    "hub model (DETECTOR_MODEL, into HF_HOME) and, with USE_SAM or USE_MOBILE_SAM, the SAM "
                    "checkpoint URL (into CHECKPOINT_CACHE_DIR). Local paths are only checked. Copy HF_HOME and "
                    "CHECKPOINT_CACHE_DIR to the cluster and set HF_HUB_OFFLINE=1 there.",
    )
    download.add_argument("--all-sam", action="store_true",
                          help="also fetch every official SAM and MobileSAM checkpoint (about 4.2 GB)")
    prelabel = commands.add_parser(
        "prelabel",
        help="pre-label every task of a Label Studio project through the running service (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Pre-label a whole Label Studio project: pages through its tasks, sends them to the running
grounded-serve service in chunks (a few chunks in flight at a time), and stores each task's prediction in
Label Studio with a stable model_version. Tasks that already have a prediction of that version are
skipped, so after Ctrl-C, a crash or failed tasks, run the same command again to continue. Tasks that
fail (e.g. an unreadable image) are not stored and are listed at the end; the exit code is then 1.

Use it instead of "Retrieve predictions" for more tasks than fit in Label Studio's 100 s /predict
timeout. See docs/prelabel.md.

examples:
  export LABEL_STUDIO_URL=http://localhost:8080 LABEL_STUDIO_API_KEY=...
  grounded-serve prelabel --project 3                       # search every label of the config
  grounded-serve prelabel --project 3 --prompt "brown cat_cats. house" --box-threshold 0.35
  grounded-serve prelabel --project 3 --view 12 --service http://gpu-box:9090""")
    prelabel.add_argument("--project", type=int, required=True, help="Label Studio project id")
    prelabel.add_argument("--label-studio-url", default=os.environ.get("LABEL_STUDIO_URL")
                          or os.environ.get("LABEL_STUDIO_HOST"), help="default: $LABEL_STUDIO_URL or $LABEL_STUDIO_HOST")
    prelabel.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY")
                          or os.environ.get("LABEL_STUDIO_ACCESS_TOKEN"),
                          help="legacy token or personal access token; default: $LABEL_STUDIO_API_KEY")
    prelabel.add_argument("--service", default=os.environ.get("GROUNDED_SERVE_URL", "http://127.0.0.1:9090"),
                          help="the running service; default: $GROUNDED_SERVE_URL or http://127.0.0.1:9090")
    prelabel.add_argument("--prompt", default="", help="same syntax as the prompt box; default: every label")
    prelabel.add_argument("--view", type=int, help="only the tasks of this Data Manager view (tab) id")
    prelabel.add_argument("--box-threshold", type=float)
    prelabel.add_argument("--text-threshold", type=float)
    prelabel.add_argument("--chunk-size", type=int, default=8, help="tasks per /predict request (default 8)")
    prelabel.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    prelabel.add_argument("--retries", type=int, default=5, help="retries of transient errors (default 5)")
    prelabel.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    jobs = commands.add_parser(
        "jobs", help="show the service's background jobs (Retrieve predictions finishing after its answer)",
        description="Lists the background jobs of the running service (GET /jobs), newest first, with a progress "
                    "bar, rate, time left and failed tasks. BASIC_AUTH_USER/BASIC_AUTH_PASS are sent if set.")
    jobs.add_argument("--service", default=os.environ.get("GROUNDED_SERVE_URL", "http://127.0.0.1:9090"),
                      help="the running service; default: $GROUNDED_SERVE_URL or http://127.0.0.1:9090")
    jobs.add_argument("--watch", action="store_true", help="refresh every 2 s until no job runs")
    jobs.add_argument("--cancel", metavar="ID", help="cancel this job (its unfinished tasks stay retryable)")
    check = commands.add_parser(
        "check", help="check the settings, the pipeline and the checkpoints; non-zero exit with the reason",
        description="Reads the environment and the Serve config's args as `serve run` would, decides the pipeline and "
                    "checks that every checkpoint can be found, without loading anything. The documented start "
                    "commands run it before `serve run`, which otherwise keeps running with no application when a "
                    "setting is refused.")
    check.add_argument("config", nargs="?", default="configs/serve.yaml",
                       help="the Serve config to read args and request_timeout_s from (default: configs/serve.yaml; "
                            "'-' for none)")
    plan = commands.add_parser(
        "gpu-plan", help="how one replica of each model per GPU places on N GPUs, and the tasks/s it predicts",
        description="Replays Ray's GPU placement (fractions auto: an equal share of one GPU among the model roles) "
                    "for one set of model replicas per GPU, predicts tasks/s from the per-GPU rate measured on one "
                    "H100, and prints the max_replicas and Ingress replicas that let autoscaling reach it "
                    "(docs/gpu-placement.md).")
    plan.add_argument("--gpus", type=int, nargs="+", default=[1], metavar="N",
                      help="GPUs per node, one number a node (default: 1); e.g. --gpus 8, or --gpus 1 1 1 1")
    plan.add_argument("--tracker", action="store_true", help="with TRACKER_MODEL's Tracker (videos)")
    plan.add_argument("--concept", action="store_true", help="SAM 3 alone (no Segmenter)")
    args = parser.parse_args(argv)

    if args.command == "gpu-plan":
        from serve_app.gpu_placement import report

        if not args.gpus or min(args.gpus) < 0 or max(args.gpus) > 64:
            parser.error("--gpus: 0 to 64 GPUs a node")
        roles = ["Detector"] + ([] if args.concept else ["Segmenter"]) + (["Tracker"] if args.tracker else [])
        print("\n".join(report(args.gpus, roles)))
        return 0

    if args.command == "check":
        from serve_app.startup_check import CheckFailed, run_check

        try:
            lines = run_check(None if args.config == "-" else args.config)
        except CheckFailed as exc:
            print(f"grounded-serve check: {exc}", file=sys.stderr)
            return 2
        print("\n".join(["grounded-serve check: ok", *lines]))
        return 0

    if args.command == "jobs":
        from serve_app.jobs_cli import run_jobs

        user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
        return run_jobs(args.service, auth=(user, password) if user and password else None, watch=args.watch,
                        cancel=args.cancel)

    if args.command == "prelabel":
        return _prelabel(parser, args)

    if args.command == "download":
        return _download(args.all_sam)

    if args.command == "make-tiny-models":
        from serve_app.tiny_models.grounding_dino_sam import make_tiny_models

        paths = make_tiny_models(args.dir, seed=args.seed)
        print(f"export DETECTOR_MODEL={paths['grounding_dino'].resolve()}")
        print("export USE_SAM=true SAM_MODEL_TYPE=tiny")
        print(f"export SAM_CHECKPOINT={paths['sam'].resolve()}")
    return 0


def _prelabel(parser: argparse.ArgumentParser, args) -> int:
    import logging

    from serve_app.prelabel import PrelabelOptions, run_prelabel

    if not args.label_studio_url or not args.api_key:
        parser.error("set --label-studio-url and --api-key (or LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)")
    for name in ("box_threshold", "text_threshold"):
        if getattr(args, name) is not None:
            try:
                unit_interval(getattr(args, name), f"--{name.replace('_', '-')}")
            except ValueError as exc:
                parser.error(str(exc))
    if args.chunk_size < 1 or args.concurrency < 1 or args.retries < 0:
        parser.error("--chunk-size and --concurrency must be at least 1, --retries at least 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    summary = run_prelabel(PrelabelOptions(
        label_studio_url=args.label_studio_url, api_key=args.api_key, project=args.project,
        service_url=args.service, prompt=args.prompt, view=args.view, box_threshold=args.box_threshold,
        text_threshold=args.text_threshold, chunk_size=args.chunk_size, concurrency=args.concurrency,
        retries=args.retries, basic_auth=(user, password) if user and password else None,
        progress=not args.no_progress))
    print(summary.line())
    for task_id, reason in list(summary.failed.items())[:20]:
        print(f"  task {task_id}: {reason}")
    if len(summary.failed) > 20:
        print(f"  ... and {len(summary.failed) - 20} more")
    if summary.interrupted:
        print("interrupted: run the same command again to continue")
        return 130
    return 1 if summary.failed else 0


def _download(all_sam: bool) -> int:
    import logging
    import os

    from serve_app.models.checkpoints import is_checkpoint_file, resolve_checkpoint
    from serve_app.models.catalog import OFFICIAL_CHECKPOINTS
    from serve_app.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings.load()
    if os.path.isdir(settings.detector_model):
        print(f"DETECTOR_MODEL is a local directory: {settings.detector_model}")
    else:
        from huggingface_hub import snapshot_download

        print(f"DETECTOR_MODEL: {snapshot_download(settings.detector_model)}")
    wanted = []
    if settings.segmenter_model and not is_checkpoint_file(settings.segmenter_model):
        if os.path.isdir(settings.segmenter_model):
            print(f"SEGMENTER_MODEL is a local directory: {settings.segmenter_model}")
        else:
            from huggingface_hub import snapshot_download

            print(f"SEGMENTER_MODEL: {snapshot_download(settings.segmenter_model)}")
    elif settings.sam_enabled:
        wanted.append((settings.segmenter_checkpoint_setting, settings.segmenter_checkpoint,
                       settings.segmenter_checkpoint_sha256))
    if all_sam:
        wanted += [(f"official {name}", url, "") for name, url in OFFICIAL_CHECKPOINTS.items()]
    for setting, source, sha256 in wanted:
        path = resolve_checkpoint(source, setting, settings.checkpoint_cache_dir or None, sha256)
        print(f"{setting}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
