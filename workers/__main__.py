"""Worker-side tools that need TensorFlow, run as ``python -m workers <command>`` so the
``batchvision`` command itself never imports it: ``demo-model`` and ``fetch-weights``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo-model", help="train a demo model on synthetic shapes (or colours)")
    p.add_argument("--out", required=True)
    p.add_argument("--kind", choices=("shapes", "colours"), default="shapes")
    p.add_argument("--epochs", type=int, default=None, help="default: 18 for shapes, 8 for colours")
    p.add_argument("--min-accuracy", type=float, default=0.95)
    sub.add_parser("fetch-weights", help="download the ImageNet weights of BATCHVISION_MODEL")
    args = parser.parse_args(argv)
    if args.command == "fetch-weights":
        from batchvision.core.settings import Settings
        from workers.keras_model import fetch_weights

        settings = Settings.from_env()
        try:
            cached = fetch_weights(settings)
        except Exception as exc:  # Keras raises a bare Exception for "URL fetch failure"
            print(
                f"could not download the ImageNet weights of BATCHVISION_MODEL={settings.model}: {exc}\n"
                "This step needs the internet (storage.googleapis.com). Offline, serve a model of a "
                "repository instead: BATCHVISION_MODEL=<its name> with the repository mounted at "
                "BATCHVISION_MODELS_DIR (compose/docker-compose.cpu.yml mounts ../models/repo).",
                file=sys.stderr,
            )
            return 1
        if cached is None:
            print(f"BATCHVISION_MODEL={settings.model} is no Keras application: no weights to download")
        else:
            print(f"weights cached under {cached}")
        return 0
    from workers.demo_model import train_colour_model, train_demo_model

    out = Path(args.out)
    if args.kind == "colours":  # the second demo model
        accuracy = train_colour_model(out, epochs=args.epochs or 8)
    else:
        accuracy = train_demo_model(out, epochs=args.epochs or 18)
    print(f"saved {out} and {out.with_name(out.stem + '.labels.txt')}; held-out accuracy {accuracy:.3f}")
    if accuracy < args.min_accuracy:
        print(f"accuracy below {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
