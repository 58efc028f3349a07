"""Command line: ``python -m iwae_bench {compare} ...``."""

from __future__ import annotations

import argparse
import sys

import kernels  # noqa: F401  (sets TRITON_INTERPRET on machines without a GPU)

from . import reference, variants
from .problems import DTYPES, Problem, make_inputs


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cmd_compare(args) -> int:
    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    problem = Problem(args.batch, args.k, args.latent, args.data_dim, args.dtype, args.seed)
    inputs = make_inputs(problem, device)
    want = reference.bound(*inputs)
    print(f"B={problem.batch} k={problem.k} d={problem.latent} D={problem.data_dim} "
          f"logits {problem.dtype} on {device}; float64 reference mean bound {want.mean().item():.4f}")
    print(f"{'variant':<9} {'bound mean':>12} {'max |err|':>11} {'finite':>7}")
    for name in args.variants:
        got = variants.get(name)(*inputs).double()
        finite = torch.isfinite(got)
        err = (got - want).abs()
        max_err = err[finite].max().item() if finite.any() else float("nan")
        print(f"{name:<9} {got.mean().item():>12.4f} {max_err:>11.3g} {finite.float().mean().item():>7.0%}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m iwae_bench",
        description="Benchmarks for importance-weighted bounds: naive, torch, torch.compile and "
                    "Triton variants of the IWAE bound, checked against a float64 reference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmp = sub.add_parser("compare", help="bound values of every variant on one problem, beside the reference",
                         description="Compute the IWAE bound with each variant on one seeded problem and "
                                     "print its error against the float64 reference.")
    cmp.add_argument("--batch", type=_positive_int, default=8, help="batch size B (default 8)")
    cmp.add_argument("--k", type=_positive_int, default=64, help="importance samples per example (default 64)")
    cmp.add_argument("--latent", type=_positive_int, default=50, help="latent width d (default 50)")
    cmp.add_argument("--data-dim", type=_positive_int, default=784, help="data dimension D (default 784, MNIST)")
    cmp.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the logits")
    cmp.add_argument("--variants", nargs="+", choices=list(variants.VARIANTS), default=list(variants.VARIANTS))
    cmp.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.set_defaults(run=_cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
