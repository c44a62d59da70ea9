"""`grounded-serve` command line: tools around the service."""

from __future__ import annotations

import argparse
import sys


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
                    "hub model (GROUNDING_DINO_MODEL, into HF_HOME) and, with USE_SAM or USE_MOBILE_SAM, the SAM "
                    "checkpoint URL (into CHECKPOINT_CACHE_DIR). Local paths are only checked. Copy HF_HOME and "
                    "CHECKPOINT_CACHE_DIR to the cluster and set HF_HUB_OFFLINE=1 there.",
    )
    download.add_argument("--all-sam", action="store_true",
                          help="also fetch every official SAM and MobileSAM checkpoint (about 4.2 GB)")
    args = parser.parse_args(argv)

    if args.command == "download":
        return _download(args.all_sam)

    if args.command == "make-tiny-models":
        from serve_app.models.tiny import make_tiny_models

        paths = make_tiny_models(args.dir, seed=args.seed)
        print(f"export GROUNDING_DINO_MODEL={paths['grounding_dino'].resolve()}")
        print("export USE_SAM=true SAM_MODEL_TYPE=tiny")
        print(f"export SAM_CHECKPOINT={paths['sam'].resolve()}")
    return 0


def _download(all_sam: bool) -> int:
    import logging
    import os

    from serve_app.models.checkpoints import resolve_checkpoint
    from serve_app.models.messages import OFFICIAL_CHECKPOINTS
    from serve_app.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings.load()
    if os.path.isdir(settings.grounding_dino_model):
        print(f"GROUNDING_DINO_MODEL is a local directory: {settings.grounding_dino_model}")
    else:
        from huggingface_hub import snapshot_download

        print(f"GROUNDING_DINO_MODEL: {snapshot_download(settings.grounding_dino_model)}")
    wanted = []
    if settings.sam_enabled:
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
