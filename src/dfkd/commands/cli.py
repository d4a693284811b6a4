"""The ``dfkd`` command line: train-teacher, distill, eval, export, plot, list, bench, demo, data.

Settings come from a recipe (``--config NAME|PATH``) plus ``key=value`` overrides.

Exit status, the same for every subcommand:

- 0: done (a run whose status is ``ok``);
- 1: the run failed: it diverged (one ``dfkd: failed: ...`` line on stderr) or collapsed (``FAILED ...`` on stdout);
  ``bench`` and ``distill --seeds`` when any of their runs failed, ``demo`` when its student failed, ``data get``
  when a download failed (``dfkd: failed: ...``);
- 2: the input was wrong: one ``dfkd: error: ...`` line on stderr, never a traceback (a flag argparse refuses too);
- 130: interrupted (Ctrl-C); a run's last completed epoch stays in RUN_DIR/ckpt/last.pt for ``--resume`` (a
  download's partial file for the same command).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dfkd.errors import ConfigError, DfkdError, DownloadError, RunFailedError

log = logging.getLogger("dfkd")

EXAMPLES = """examples:
  dfkd demo
  dfkd train-teacher --config teachers/fashion-mnist-32-lenet5_bn out=runs/teacher
  dfkd distill --config fashion-mnist/cudfkd-lenet5_bn-lenet5_half teacher.weights=runs/teacher out=runs/cudfkd
  dfkd distill --resume runs/cudfkd
  dfkd eval --weights runs/cudfkd --teacher runs/teacher
  dfkd export runs/cudfkd --format safetensors          (writes runs/cudfkd/export: the student + card.json)
  dfkd plot runs/cudfkd   (t-SNE and class histogram of the synthetic images, in runs/cudfkd/plots)
  dfkd list recipes
  dfkd data get cifar10          (downloads and verifies the official archive; `dfkd data list` shows what is here)
  dfkd bench fashion-mnist --methods cudfkd,dafl
  dfkd bench fashion-mnist --seeds 0,1,2 --budget 1800 --teacher RUN   (the accuracy-per-second race)
  dfkd bench cifar10 --plan                       (the paper's tables: the cells and their hours on this machine)
  dfkd bench cifar10 --devices 0,1,2,3 --seeds 0,1,2    (one cell per GPU at a time)
  dfkd bench cifar10 --launcher slurm --job slurm_partition=gpu --job timeout_min=1440; dfkd bench cifar10 --collect OUT
"""


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(2, f"dfkd: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dfkd",
        description="Data-free knowledge distillation: compress a teacher into a student without its training data.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dfkd {_version()}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def run_command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", metavar="NAME|PATH", help="a shipped recipe (`dfkd list recipes`) or a YAML")
        p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
        p.add_argument("--overwrite", action="store_true", help="replace a run already in the output directory")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. train.epochs=5 out=runs/x")
        _trust_code_flag(p)
        return p

    run_command("train-teacher", "train a network on real data (a teacher, or the real-data student reference)")
    p = run_command("distill", "distill a teacher into a student without its training data")
    p.add_argument(
        "--seeds",
        metavar="A,B",
        help="run once per seed into OUT/seed<N> and report mean ± std (finished seeds are reused)",
    )

    p = sub.add_parser("eval", help="top-1 of a checkpoint on the test set (and agreement with a teacher)")
    p.add_argument(
        "--weights", "-w", required=True, metavar="CKPT", help="a checkpoint file, a run directory or an export"
    )
    p.add_argument("--arch", metavar="NAME", help="architecture (default: the one recorded in the checkpoint)")
    p.add_argument("--teacher", metavar="CKPT", help="also report agreement with this teacher")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. data.name=fashion-mnist-32 engine.device=cpu"
    )
    _trust_code_flag(p)

    p = sub.add_parser("export", help="write a run's student to ship (safetensors, TorchScript or ONNX) + card.json")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of `dfkd distill`")
    p.add_argument(
        "--format",
        choices=["safetensors", "torchscript", "onnx"],
        default="safetensors",
        help="safetensors: the bare network's weights (default); torchscript, onnx: the network with its "
        "normalisation inside, taking [0, 1] images (onnx needs `pip install 'dfkd[onnx]'`)",
    )
    p.add_argument(
        "--which",
        choices=["best", "last"],
        help="last: the final epoch; best: the checkpoint the run chose on its evaluation split (default: last, or "
        "best when the run chose it on the validation slice or on held-out synthetic images; the card says which)",
    )
    p.add_argument("--out", metavar="DIR", help="the export folder (default: RUN_DIR/export)")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in the folder")
    p.add_argument(
        "--force", action="store_true", help="export the student of a run that collapsed or diverged (the card says so)"
    )
    p = sub.add_parser(
        "plot",
        help="t-SNE of teacher features (real test vs synthetic images) and the teacher's classes on synthetic images",
        description="Rebuild a distillation run's teacher and method, draw synthetic images as its student gets them "
        "and write RUN_DIR/plots/tsne.png, class_hist.png and plot.json.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the directory of a `dfkd distill` run")
    p.add_argument("--real", type=int, default=500, metavar="N", help="real test images in the t-SNE (default 500)")
    p.add_argument("--synthetic", type=int, default=500, metavar="N", help="synthetic images to draw (default 500)")
    p.add_argument("--which", choices=["last", "best"], default="last", help="the checkpoint (default: last)")
    _trust_code_flag(p)

    p = sub.add_parser("list", help="list methods, models, datasets or recipes")
    p.add_argument("what", choices=["methods", "models", "datasets", "recipes"])

    p = sub.add_parser("bench", help="run a suite of recipes against one teacher and print the result table")
    p.add_argument(
        "suite",
        help="cifar10 | cifar100 (the CuDFKD paper's result and cost tables: every pair x method x seed) | "
        "fashion-mnist | fashion-mnist-resnet | gpu-check (one short epoch of every method in fp32 and bf16: "
        "the first thing to run on a GPU machine) | throughput (the speed of one recipe in fp32 and each fast "
        "setting on this machine)",
    )
    p.add_argument(
        "--out", metavar="DIR", help="where the runs go (default: runs/bench-SUITE); finished runs are reused"
    )
    p.add_argument("--methods", metavar="A,B", help="only these methods (default: every method with a recipe)")
    p.add_argument("--teacher", metavar="RUN", help="an existing teacher run or checkpoint (default: train one)")
    p.add_argument("--seeds", metavar="A,B", help="run every recipe once per seed; rows become mean ± std")
    p.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="a race: every run stops at this wall time; writes race.md (time to 70/75/80/85 %%, top-1 at 10 and "
        "30 min) and race.png (accuracy against wall time) beside the table",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="gpu-check, cifar10, cifar100: tiny networks and sizes, so that the whole path runs on a CPU in minutes",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="gpu-check and throughput only: replace their runs already in --out"
    )
    p.add_argument("--recipe", metavar="NAME|PATH", help="throughput only: the recipe (default: the demo's)")
    p.add_argument(
        "--rounds", type=int, help="throughput: rounds per setting (default: 8); --plan: rounds timed per recipe (1)"
    )
    tables = p.add_argument_group("cifar10 / cifar100 (the paper's tables)")
    tables.add_argument("--pairs", metavar="A,B", help="only these columns, e.g. resnet34-resnet18,wrn40_2-wrn16_1")
    tables.add_argument(
        "--teachers",
        metavar="DIR",
        help="the teachers as the CMI model zoo names them (DIR/cifar10_resnet34.pth, ...) instead of training them",
    )
    tables.add_argument(
        "--plan",
        action="store_true",
        help="run nothing: list the cells, their student steps and images, and estimate each one's hours on this "
        "machine from a few timed rounds (plan.md)",
    )
    tables.add_argument(
        "--plan-batch",
        type=int,
        metavar="N",
        help="--plan: time at batches of at most N and scale linearly to each recipe's (for a slow machine)",
    )
    tables.add_argument("--devices", metavar="0,1,...", help="one cell per GPU at a time, from a queue")
    tables.add_argument(
        "--launcher",
        choices=["slurm", "submitit-local"],
        help="submit every cell as a job through submitit (pip install 'dfkd[slurm]'); submitit-local: the same "
        "path on this machine",
    )
    tables.add_argument(
        "--job",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a submitit parameter for every job, repeatable: timeout_min=1440, gpus_per_node=1, cpus_per_task=8, "
        "slurm_partition=gpu, ...",
    )
    tables.add_argument("--wait", action="store_true", help="with --launcher: wait for the jobs and write the tables")
    tables.add_argument(
        "--collect", metavar="OUT", help="run nothing: assemble the tables from the cells finished in OUT"
    )
    p.add_argument(
        "--settings",
        metavar="A,B",
        help="throughput only: from fp32,fp32-cl,bf16,bf16-cl,fp32-compile,bf16-cl-compile (default: the first four)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="applied to every distillation, e.g. train.epochs=2"
    )

    p = sub.add_parser(
        "data",
        help="download and verify the files of cifar10, cifar100, svhn, mnist, fashion-mnist",
        description="Download the official files of a dataset, check them against their published checksums and "
        "put them where dfkd finds them (files already there are only verified).",
    )
    data = p.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser, required=True)
    root_help = "the data root (default: the first $DFKD_DATA entry, else ~/.local/share/dfkd/datasets)"
    p = data.add_parser("get", help="download NAME's files unless they are already here and verified")
    p.add_argument("name", metavar="NAME", help="cifar10 | cifar100 | svhn | mnist | fashion-mnist")
    p.add_argument("--root", metavar="DIR", help=root_help)
    p.add_argument(
        "--mirror",
        metavar="URL",
        help="an http(s):// or file:// location laid out like a data root (e.g. URL/mnist/...) to download from "
        "instead of the publishers (also $DFKD_DATA_MIRROR); the published checksums still apply",
    )
    p = data.add_parser("list", help="each dataset's files: verified (and where), not matching, or missing")
    p.add_argument("--root", metavar="DIR", help="also search DIR first (as data.root=DIR would)")

    p = sub.add_parser("demo", help="train a Fashion-MNIST teacher, distill it data-free with CuDFKD, compare")
    p.add_argument("--out", metavar="DIR", help="where the three runs go (default: runs/demo-TIMESTAMP)")
    p.add_argument("--smoke", action="store_true", help="a one-minute version with tiny budgets (for checks)")
    p.add_argument(
        "--seed", type=int, default=0, help="the seed of all three runs (default 0); printed with the result"
    )
    return parser


def _trust_code_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="run the code that a network names (hub:, py:, TorchScript files and exports) in this run; it is not "
        "saved, so --resume and plot ask for it again",
    )


def _version() -> str:
    from dfkd._version import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after the flags; argparse alone stops at the first flag.
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "trust_code", False) and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, "trust_code=true"]  # the one key the engine reads it from
    _setup_logging(args.quiet)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except (RunFailedError, DownloadError) as exc:  # the command failed (a run, a server, a transfer), not its input
        sys.stderr.write(f"dfkd: failed: {exc}\n")
        return 1
    except DfkdError as exc:
        sys.stderr.write(f"dfkd: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        if args.command == "data":
            sys.stderr.write("dfkd: interrupted; the partial file (.part) is kept and the same command resumes it\n")
        else:
            sys.stderr.write("dfkd: interrupted; a run's last completed epoch is in RUN_DIR/ckpt/last.pt (--resume)\n")
        return 130


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced, e.g. by a test harness)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("dfkd")
    console = next((h for h in logger.handlers if isinstance(h, _ConsoleHandler)), None)
    if console is None:
        console = _ConsoleHandler()
        console.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(console)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.setLevel(logging.INFO)  # the run directory's log.txt keeps INFO even when the console is quiet
    logger.propagate = False


def _load(kind: str, args: argparse.Namespace):
    from dfkd.config import deep_merge, load_config, parse_overrides, read_yaml

    overrides = parse_overrides(args.overrides)
    if args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise DfkdError(f"nothing to resume in {args.resume}: it holds no config.yaml")
        if args.config:
            raise ConfigError("--resume takes the run's own config.yaml: drop --config")
        data = deep_merge(read_yaml(saved), overrides)
        data["out"] = str(args.resume)
        from dfkd.config import build_config

        return build_config(kind, data)
    return load_config(kind, args.config, overrides)


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from dfkd.engine.distill import best_label
    from dfkd.engine.supervised import train_teacher

    cfg = _load("train-teacher", args)
    summary = train_teacher(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    _write(
        f"{summary['model']} on {summary['dataset']}: top-1 {summary['top1_last']:.2f}% at the final epoch "
        f"(best {summary['top1_best']:.2f}% at epoch {summary['best_epoch']}, {best_label(summary['eval_split'])}); "
        f"weights: {summary['weights']}"
    )
    return 0


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or a range ``0-4`` (or both: ``0-2,7``) -> a list of distinct seeds in order."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            low, sep, high = part.partition("-")
            values = range(int(low), int(high) + 1) if sep and low else [int(part)]
            seeds += [v for v in values if v not in seeds]
    except ValueError:
        raise ConfigError(f"--seeds takes integers like 0,1,2 or 0-4, got '{text}'") from None
    if not seeds:
        raise ConfigError(f"--seeds names no seed: '{text}'; give e.g. 0,1,2")
    return seeds


def _status_line(s: dict) -> str | None:
    """The failure line of a collapsed or diverged run, else None."""
    if s.get("status", "ok") == "ok":
        return None
    return (
        f"FAILED ({s['status']}): {s.get('status_reason')}; this run's accuracy is not a result. Run dir {s['run_dir']}"
    )


def cmd_distill(args: argparse.Namespace) -> int:
    from dfkd.engine.distill import best_label, distill

    if args.seeds:
        return _distill_seeds(args)
    cfg = _load("distill", args)
    s = distill(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    failure = _status_line(s)
    if failure:
        _write(failure)
        return 1
    label = best_label(s.get("eval_split"))
    if s["student_top1_best"] is None:  # data.name=none: no labels, the student is scored by agreement alone
        score = (
            f"agreement with the teacher on held-out synthetic images {s['agreement_last']:.2f}% at the last epoch "
            f"(best {s['agreement_best']:.2f}%, {label}; no test set)"
        )
    else:
        score = (
            f"student top-1 {s['student_top1_last']:.2f}% at the last epoch (best {s['student_top1_best']:.2f}%, "
            f"{label}; teacher {s['teacher_top1']:.2f}%), agreement {s['agreement_last']:.2f}% (last epoch)"
        )
    _write(
        f"{s['method']}: {s['teacher']} -> {s['student']} on {s['dataset']}: {score}, "
        f"{s['images_synthesized']:,} images synthesised in {s['total_seconds']:.0f}s; run dir {s['run_dir']}"
    )
    return 0


def _distill_seeds(args: argparse.Namespace) -> int:
    from dfkd.commands.bench import run_seeds

    if args.resume or args.overwrite:
        raise ConfigError(
            "--seeds reuses finished seeds and resumes interrupted ones by itself: drop --resume/--overwrite"
        )
    seeds = parse_seeds(args.seeds)
    cfg = _load("distill", args)  # validates the recipe and the overrides once, before any run starts
    if not cfg.out:
        raise ConfigError("--seeds needs out=DIR: each seed runs into DIR/seed<N>")
    overrides = [o for o in args.overrides if o.partition("=")[0].strip() != "out"]
    summaries = run_seeds(args.config, Path(cfg.out), seeds, overrides)
    lines, failed = seed_report(summaries, Path(cfg.out) / "seeds.json")
    _write("\n".join(lines))
    return 1 if failed else 0


def seed_report(summaries: list[dict], details: str | Path) -> tuple[list[str], int]:
    """``distill --seeds``' report: a line per seed (a failed one says so and shows no score), then mean ± std over
    the seeds that did not fail, the last epoch first; and the number of failed seeds."""
    from dfkd.commands.bench import aggregate_seeds
    from dfkd.engine.distill import best_label
    from dfkd.engine.rundir import scored_by
    from dfkd.errors import STATUS_OK

    # a data.name=none run has no top-1: its seeds are compared by agreement with the teacher
    scored, _ = scored_by(summaries)
    label = best_label(summaries[0].get("eval_split"))
    ok = [s for s in summaries if s.get("status", STATUS_OK) == STATUS_OK]
    failed = [s["seed"] for s in summaries if s.get("status", STATUS_OK) != STATUS_OK]
    lines = [
        f"seed {s['seed']}: ok, last {s[scored + '_last']:.2f}%, best {s[scored + '_best']:.2f}% ({label})"
        if s.get("status", STATUS_OK) == STATUS_OK
        else f"seed {s['seed']}: FAILED ({s['status']}): {s.get('status_reason')}"
        for s in summaries
    ]
    n = len(summaries)
    head = f"{summaries[0]['method']} over {n} seeds: failed seeds: {len(failed)}/{n}"
    head += f" ({', '.join(map(str, failed))}); " if failed else "; "
    if not ok:
        lines.append(f"{head}no seed finished without failing: no mean; details in {details}")
        return lines, len(failed)
    agg = aggregate_seeds(ok)
    last, best, agree = agg[scored + "_last"], agg[scored + "_best"], agg["agreement_last"]
    over = f"over the {len(ok)} that did not fail: " if failed else ""
    lines.append(
        f"{head}{over}last {last['mean']:.2f} ± {last['std']:.2f}%, best {best['mean']:.2f} ± {best['std']:.2f}% "
        f"({label}), agreement {agree['mean']:.2f} ± {agree['std']:.2f}% (last epoch); details in {details}"
    )
    return lines, len(failed)


def cmd_eval(args: argparse.Namespace) -> int:
    from dfkd.config import load_config
    from dfkd.engine.evaluate import evaluate_weights
    from dfkd.errors import FAILED_STATUSES

    extra = [f"model.weights={args.weights}"]
    if args.arch:
        extra.append(f"model.arch={args.arch}")
    if args.teacher:
        extra.append(f"teacher.weights={args.teacher}")
    cfg = load_config("eval", None, list(args.overrides) + extra)
    r = evaluate_weights(cfg)
    line = f"{r['arch']} on {r['dataset']} ({r['images']} test images): top-1 {r['top1']:.2f}%"
    if Path(r["weights"]).name == "best.pt" or r.get("checkpoint") == "best":
        what = "an export of best.pt" if r.get("checkpoint") else "best.pt"
        line += f" ({what}: the epoch its run chose on its evaluation split; on that split this is not a fresh score)"
    if "agreement" in r:
        line += (
            f", teacher top-1 {r['teacher_top1']:.2f}%, agreement {r['agreement']:.2f}%, "
            f"prob. loyalty {r['prob_loyalty']:.4f} (reference form {r['prob_loyalty_reference']:.4f})"
        )
    if r.get("run_status") in FAILED_STATUSES:
        line += f" (exported from a {r['run_status']} run: not a result)"
    _write(f"{line}\nweights: {r['weights']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dfkd.engine.export import export_student

    card = export_student(args.run_dir, args.format, args.which, args.out, args.overwrite, args.force)
    acc = card["accuracy"]
    score = ", ".join(
        f"{name} {acc[key]:.2f}%"
        for key, name in (("top1", "top-1"), ("agreement", "agreement"))
        if isinstance(acc.get(key), (int, float))
    )
    weights = Path(card["path"]).parent / card["weights"]["file"]
    _write(
        f"{card['architecture']} ({card['num_classes']} classes, input {'x'.join(map(str, card['input_shape']))}): "
        f"{score or 'no score'} on {acc['split']}; {card['selected_by']}\n"
        f"weights: {weights} (sha256 {card['weights']['sha256'][:16]}...)\ncard: {card['path']}"
    )
    if card.get("warning"):
        _write(f"note: {card['warning']}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from dfkd.commands.plot import plot_run

    r = plot_run(args.run_dir, real=args.real, synthetic=args.synthetic, which=args.which, trust_code=args.trust_code)
    hit = sum(1 for count in r["class_counts"] if count)
    real = f"against {r['real_images']} real test images" if r["real_images"] else f"alone ({r['real_missing_reason']})"
    _write(
        f"{r['method']}, {args.which} checkpoint (epoch {r['epoch']}): {r['synthetic_images']} synthetic images "
        f"{real}; the teacher puts them in {hit} of {r['num_classes']} classes (entropy {r['class_entropy']:.2f} "
        f"of {r['class_entropy_max']:.2f} nats)\nwrote {', '.join(r['files'])}"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from dfkd.methods import describe_method, method_names

        rows = [(name, describe_method(name)) for name in method_names()]
    elif args.what == "models":
        from dfkd.models import describe_model, model_names

        rows = [(name, describe_model(name)) for name in model_names()]
    elif args.what == "datasets":
        from dfkd.data import dataset_info, dataset_names

        rows = []
        for name in dataset_names():
            info = dataset_info(name)
            shape = "x".join(map(str, info.image_shape))
            rows.append((name, f"{info.num_classes} classes, {shape}: {info.description}"))
    else:
        from dfkd.config import find_recipe, read_yaml, recipe_names

        rows = []
        for name in recipe_names():
            data = read_yaml(find_recipe(name))
            expected = (data.get("expected") or {}).get("top1")
            lines = str(data.get("description") or "").strip().splitlines()
            text = lines[0] if lines else ""
            rows.append((name, text + (f" [published top-1 {expected}]" if expected is not None else "")))
    width = max((len(name) for name, _ in rows), default=0)
    for name, text in rows:
        _write(f"{name.ljust(width)}  {text}")
    return 0


TABLE_FLAGS = ("pairs", "teachers", "plan", "plan_batch", "devices", "launcher", "job", "wait", "collect")


def _names(text: str | None) -> list[str] | None:
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


def cmd_bench(args: argparse.Namespace) -> int:
    from dfkd.commands.bench import run_suite
    from dfkd.commands.tables import TABLE_SUITES

    methods = _names(args.methods)
    if args.overwrite and args.suite not in ("gpu-check", "throughput"):
        raise ConfigError("--overwrite belongs to gpu-check and throughput; the other suites reuse their finished runs")
    if args.suite in TABLE_SUITES:
        return _bench_tables(args, methods)
    given = [f"--{flag.replace('_', '-')}" for flag in TABLE_FLAGS if getattr(args, flag)]
    if given:
        raise ConfigError(f"{', '.join(given)} belong to the table suites (cifar10, cifar100); drop them")
    out = args.out or f"runs/bench-{args.suite}"
    if args.suite == "gpu-check":
        from dfkd.commands.gpucheck import run_gpu_check

        if args.seeds or args.overrides or args.budget is not None:
            raise ConfigError("gpu-check runs fixed settings: drop --seeds, --budget and key=value overrides")
        ok, table = run_gpu_check(out, args.teacher, args.tiny, methods, args.overwrite)
        _write(table)
        return 0 if ok else 1
    if args.suite == "throughput":
        from dfkd.commands.throughput import DEFAULT_RECIPE, DEFAULT_ROUNDS, parse_settings, run_throughput

        if args.seeds or args.methods or args.tiny or args.budget is not None:
            raise ConfigError(
                "throughput measures one recipe: drop --seeds, --methods, --budget and --tiny (use --recipe)"
            )
        rounds = args.rounds if args.rounds is not None else DEFAULT_ROUNDS
        settings = parse_settings(args.settings)
        recipe = args.recipe or DEFAULT_RECIPE
        _write(run_throughput(out, recipe, settings, rounds, args.teacher, list(args.overrides), args.overwrite))
        return 0
    if args.recipe or args.rounds is not None or args.settings:
        raise ConfigError("--recipe, --rounds and --settings belong to `dfkd bench throughput`; drop them for a suite")
    if args.tiny:
        raise ConfigError("--tiny belongs to `dfkd bench gpu-check` and the table suites; drop it for this suite")
    seeds = parse_seeds(args.seeds) if args.seeds else None
    table, failed = run_suite(args.suite, out, methods, args.teacher, list(args.overrides), seeds, args.budget)
    _write(table)
    if failed:
        _write(f"FAILED: {len(failed)} run(s) collapsed or diverged (marked in the table): {', '.join(failed)}")
    return 1 if failed else 0


def _bench_tables(args: argparse.Namespace, methods: list[str] | None) -> int:
    from dfkd.commands.launch import parse_devices, parse_job_options, run_table_suite
    from dfkd.commands.tables import make_plan, select, write_tables

    if args.teacher or args.budget is not None or args.recipe or args.settings:
        raise ConfigError(
            "the table suites take --teachers DIR (the zoo's files), not --teacher; --budget, --recipe and "
            "--settings belong to the other suites"
        )
    if args.collect and args.out and Path(args.out) != Path(args.collect):
        raise ConfigError("--collect OUT reads the cells in OUT: drop --out")
    out = args.collect or args.out or f"runs/bench-{args.suite}"
    seeds = parse_seeds(args.seeds) if args.seeds else None
    sel = select(args.suite, _names(args.pairs), methods, seeds, args.teachers, args.tiny, list(args.overrides))
    if args.collect:
        if not Path(out).is_dir():
            raise ConfigError(f"--collect {out}: no such folder; give the OUT of an earlier `dfkd bench {args.suite}`")
        return _tables_result(*write_tables(sel, out))
    if args.plan:
        from dfkd.commands.tables import format_plan

        _write(format_plan(make_plan(sel, out, args.rounds if args.rounds is not None else 1, args.plan_batch)))
        return 0
    if args.rounds is not None or args.plan_batch is not None:
        raise ConfigError("--rounds and --plan-batch belong to --plan (--rounds also to `dfkd bench throughput`)")
    if args.wait and not args.launcher:
        raise ConfigError("--wait belongs to --launcher: without one the cells run here and the command waits")
    devices = parse_devices(args.devices) if args.devices else None
    return _tables_result(*run_table_suite(sel, out, devices, args.launcher, parse_job_options(args.job), args.wait))


def _tables_result(text: str, failed: list[str]) -> int:
    """Print the tables; a table holding a failed run is a failed command (exit 1), as for every suite."""
    _write(text)
    if failed:
        _write(f"FAILED: {len(failed)} run(s) of the table collapsed, diverged or crashed: {', '.join(failed)}")
    return 1 if failed else 0


def cmd_data(args: argparse.Namespace) -> int:
    from dfkd.data import candidate_roots, get_dataset
    from dfkd.data.download import REMOTE, dataset_status

    if args.action == "list":
        width = max(len(name) for name in REMOTE)
        for name in REMOTE:
            statuses = dataset_status(name, args.root)
            if all(s.verified for s in statuses):
                text = "verified in " + ", ".join(sorted({str(s.root) for s in statuses}))
            else:
                missing = sum(s.root is None for s in statuses)
                parts = [f"{missing} of {len(statuses)} files missing"] if missing else []
                parts += [f"{s.path} does not match its checksum" for s in statuses if s.root and not s.verified]
                text = f"{'; '.join(parts)} (`dfkd data get {name}`)"
            _write(f"{name.ljust(width)}  {text}")
        return 0
    where = get_dataset(args.name, args.root, mirror=args.mirror)
    if where in candidate_roots(None):
        found = "dfkd finds them there without flags"
    else:
        found = f"pass data.root={where} or set DFKD_DATA={where} for dfkd to find them"
    _write(f"{args.name}: the files are in {where}, verified; {found}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dfkd.commands.demo import run_demo

    ok, text = run_demo(args.out, smoke=args.smoke, seed=args.seed)
    _write(text)
    return 0 if ok else 1


COMMANDS = {
    "train-teacher": cmd_train_teacher,
    "distill": cmd_distill,
    "eval": cmd_eval,
    "export": cmd_export,
    "plot": cmd_plot,
    "list": cmd_list,
    "bench": cmd_bench,
    "data": cmd_data,
    "demo": cmd_demo,
}
