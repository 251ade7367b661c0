"""ssmooth-import: turn a checkpoint published with a randomized-smoothing paper into an ssmooth checkpoint.

  ssmooth-import models/cifar10/resnet110/noise_0.25/checkpoint.pth.tar --family cohen --dataset cifar10 \\
      --sigma 0.25 --out imported/cohen_cifar10_s0.25.ckpt
  ssmooth-certify ckpt=imported/cohen_cifar10_s0.25.ckpt certify.skip=20          # Cohen's 500 test images
  ssmooth-train stage=finetune pretrained=imported/cohen_cifar10_s0.25.ckpt noise=samplewise

Families: cohen, smoothadv, consistency (CIFAR-10 ResNet-110, ImageNet ResNet-50; consistency also MNIST
LeNet) and macer (CIFAR-10 ResNet-110, MNIST LeNet). The files do not record the training noise level: give it
with --sigma (the published folders name it, e.g. noise_0.25). The normalization in front of the network is not
in the files either; each family's own is the default (SmoothAdv: by folder), --normalization overrides it.
A file that does not match (family, keys, shapes, architecture) exits with status 2 and one line saying what.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssmooth.cli.common import ConfigError, exit_on_config_error


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; bad input here gets one line, status 2
        print(f"error: {message} (see ssmooth-import --help)", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    from ssmooth.checkpoints import FAMILIES, NORMALIZATIONS

    p = _OneLineParser(prog="ssmooth-import", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("file", type=Path, help="the published checkpoint (e.g. checkpoint.pth.tar)")
    p.add_argument("--family", required=True, help=f"who published it: {' | '.join(FAMILIES)}")
    p.add_argument("--dataset", required=True, help="cifar10 | mnist | imagenet")
    p.add_argument("--sigma", required=True, type=float, help="the noise level the network was trained at")
    p.add_argument("--normalization", default=None,
                   help=f"{' | '.join(NORMALIZATIONS)}; default: what the family used for this dataset")
    p.add_argument("--out", required=True, type=Path, help="where to write the ssmooth checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


@exit_on_config_error
def run(args: argparse.Namespace) -> Path:
    from ssmooth.checkpoints import ImportMismatch, import_published, write_checkpoint

    if args.out.exists() and not args.force:
        raise ConfigError(f"--out {args.out} exists; pass --force to overwrite it")
    try:
        model, meta = import_published(args.file, args.family, args.dataset, args.sigma, args.normalization)
    except ImportMismatch as err:
        raise ConfigError(str(err)) from None
    try:
        out = write_checkpoint(args.out, model, meta)
    except OSError as err:  # an unwritable or missing parent folder: say which, without a traceback
        raise ConfigError(f"--out {args.out}: cannot write ({err.strerror or err})") from None
    source = meta["imported"]
    norm = source["normalization"]
    print(f"wrote {out}: {source['family']} {meta['dataset']['name']} {meta['model']['name']} "
          f"(arch {source['arch']}), sigma {meta['noise']['sigma']}, normalization {norm['kind']} "
          f"(mean {norm['mean']}, std {norm['std']}), source sha256 {source['sha256'][:16]}...")
    print(f"certify it: ssmooth-certify ckpt={out}")
    return out


def main(argv: list[str] | None = None) -> None:
    run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
