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
    args = parser.parse_args(argv)

    if args.command == "make-tiny-models":
        from serve_app.models.tiny import make_tiny_models

        paths = make_tiny_models(args.dir, seed=args.seed)
        print(f"export GROUNDING_DINO_MODEL={paths['grounding_dino'].resolve()}")
        print("export USE_SAM=true SAM_MODEL_TYPE=tiny")
        print(f"export SAM_CHECKPOINT={paths['sam'].resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
