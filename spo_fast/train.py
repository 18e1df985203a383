"""``python -m spo_fast.train``: SPO training from the command line.

    python -m spo_fast.train                                  # the built-in toy world (CPU, a few minutes)
    python -m spo_fast.train --preset sd15 --model.pretrained runwayml/stable-diffusion-v1-5 \\
        --preference.checkpoint sd-v1-5_step_aware.bin --data.prompts 4k_training_prompts.json
    python -m spo_fast.train --config run.yaml --train.lr 1e-4 --print-config

Settings resolve as preset < config file < ``--section.key value`` overrides.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import PRESETS, config_to_dict, field_help, make_config

logger = logging.getLogger("spo_fast.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spo_fast.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="toy", choices=sorted(PRESETS), help="starting values (default: toy)")
    p.add_argument("--config", default=None, help="YAML or JSON file with sections model/preference/data/...")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--resume", action="store_true", help="continue the run in log.output_dir from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in log.output_dir")
    g = p.add_argument_group("config keys (--section.key value)")
    for key, help_text in field_help().items():
        g.add_argument(f"--{key}", dest=f"ov:{key}", default=None, metavar="V", help=help_text)
    return p


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, object]:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        valid = ", ".join(f"--{k}" for k in field_help())
        parser.error(f"unknown argument(s) {' '.join(unknown)}; valid config keys: {valid}")
    overrides = {k[3:]: v for k, v in vars(args).items() if k.startswith("ov:") and v is not None}
    cfg = make_config(args.preset, args.config, overrides)
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args, cfg = parse(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    from .trainer import NonFiniteLossError, SPOTrainer

    try:
        trainer = SPOTrainer(cfg, resume=args.resume, overwrite=args.overwrite)
        summary = trainer.run()
    except (ValueError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    print(
        f"\nSPO run written to {summary['output_dir']}: report.png, metrics.jsonl, samples_*.png, lora/, checkpoints/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
