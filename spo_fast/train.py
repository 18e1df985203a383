"""``python -m spo_fast.train``: SPO training from the command line.

    python -m spo_fast.train                                  # the built-in toy world (CPU, a few minutes)
    python -m spo_fast.train --preset sd15 --model.pretrained runwayml/stable-diffusion-v1-5 \\
        --preference.checkpoint sd-v1-5_step_aware.bin --data.prompts 4k_training_prompts.json
    python -m spo_fast.train --config run.yaml --train.lr 1e-4 --print-config
    torchrun --nproc_per_node 8 -m spo_fast.train --preset sd15 ...    # DDP, one process per GPU
    torchrun --nproc_per_node 8 -m spo_fast.train --deepspeed configs/deepspeed/zero2_lora.json ...

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
    d = p.add_argument_group("distributed (launch with torchrun; see README)")
    d.add_argument("--deepspeed", default=None, metavar="JSON", help="DeepSpeed config (ZeRO-1/2 for LoRA, ZeRO-3 for "
                   "full fine-tuning); batch sizes must agree with train.batch_size / train.grad_accum")  # fmt: skip
    d.add_argument("--dist-timeout", type=float, default=None, metavar="S", help="seconds a collective may wait "
                   "(default 900, env SPO_FAST_DIST_TIMEOUT)")  # fmt: skip
    d.add_argument("--dist-init-timeout", type=float, default=None, metavar="S", help="seconds to reach the master "
                   "and the other ranks (default 120, env SPO_FAST_DIST_INIT_TIMEOUT)")  # fmt: skip
    # The deepspeed launcher appends --local_rank; LOCAL_RANK from the environment is what is used.
    d.add_argument("--local_rank", "--local-rank", dest="local_rank", default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("config keys (--section.key value)")
    for key, help_text in field_help().items():
        g.add_argument(f"--{key}", dest=f"ov:{key}", default=None, metavar="V", help=help_text.replace("%", "%%"))
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
    from .distributed import init_distributed
    from .trainer import NonFiniteLossError, SPOTrainer

    ctx, clean = None, True
    try:
        ctx = init_distributed(
            cfg.train.device,
            timeout_s=args.dist_timeout,
            init_timeout_s=args.dist_init_timeout,
            force_group=args.deepspeed is not None,
        )
        if ctx.rank != 0:  # one copy of the progress messages; warnings and errors still come from every rank
            logging.getLogger().setLevel(logging.WARNING)
        trainer = SPOTrainer(
            cfg, resume=args.resume, overwrite=args.overwrite, dist=ctx, deepspeed_config=args.deepspeed
        )
        summary = trainer.run()
    except (ValueError, NonFiniteLossError) as e:
        where = f"rank {ctx.rank}/{ctx.world_size}: " if ctx is not None and ctx.enabled else ""
        print(f"error: {where}{e}", file=sys.stderr)
        return 2
    except BaseException:
        clean = False
        raise
    finally:
        if ctx is not None:
            ctx.close(barrier=clean)
    if ctx.rank != 0:
        return 0
    print(json.dumps(summary, indent=2))
    print(
        f"\nSPO run written to {summary['output_dir']}: report.png, metrics.jsonl, samples_*.png, lora/, checkpoints/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
