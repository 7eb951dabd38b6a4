"""The ``avforge`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.errors import AvforgeError

log = logging.getLogger("avforge")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    overrides = list(args.set or [])
    if args.address:
        overrides.append(f"ray.address={args.address}")
    config = load_config(args.config, overrides)
    if args.dry_run:
        from pipeline.runner import dry_run

        report = dry_run(args.input, config)
        print(f"config OK; stages: {', '.join(report['stages'])}")
        print(f"inputs: {report['inputs']}")
        for outcome, n in sorted(report["outcomes"].items(), key=lambda kv: -kv[1]):
            example = report["examples"].get(outcome)
            print(f"  {outcome:<28} {n:>8}" + (f"   e.g. {example}" if example else ""))
        return 0
    summary = run_pipeline(args.input, args.output, config, backend=args.backend)
    print("\n".join(["", "avforge run finished", *summary.lines()]))
    print(f"shards:      {summary.output / 'shards'}  (open with webdataset: see README 'Reading the output')")
    return 0


def _cmd_samples(args: argparse.Namespace) -> int:
    from pipeline.samples import generate_corpus, parse_size

    try:
        width, height = parse_size(args.size)
    except ValueError as exc:
        raise SystemExit(f"avforge samples: {exc}") from None
    videos = generate_corpus(
        Path(args.dir), count=args.count, seed=args.seed, duration=args.duration, width=width, height=height
    )
    out = Path(args.dir)
    if args.base_url:
        base = args.base_url.rstrip("/")
        (out / "urls.txt").write_text("".join(f"{base}/{v.path.name}\n" for v in videos))
        print(f"wrote {len(videos)} videos and {out / 'urls.txt'}")
    else:
        print(f"wrote {len(videos)} videos; input list: {out / 'inputs.txt'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Generate samples, serve them on 127.0.0.1 (yt-dlp path), run the pipeline, show the result."""
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline
    from pipeline.samples import generate_corpus
    from pipeline.serve import serve_directory

    root = Path(args.dir).resolve()
    samples = root / "samples"
    if not (samples / "manifest.jsonl").exists():
        generate_corpus(samples, count=args.count, seed=0)
    names = sorted(p.name for p in samples.glob("sample_*.mp4"))
    # the samples are served on loopback, which downloads refuse unless allowed
    config = load_config(args.config, ["download.allowed_hosts=[127.0.0.1]", *(args.set or [])])
    with serve_directory(samples) as base:
        inputs = root / "urls.txt"
        inputs.write_text("".join(f"{base}/{n}\n" for n in names))
        log.info("serving %d sample videos at %s", len(names), base)
        summary = run_pipeline(inputs, root / "out", config, backend=args.backend)
    shards = sorted((summary.output / "shards").glob("*.tar"))
    print("\n".join(["", "avforge demo finished", *summary.lines()]))
    print(f"shards:      {len(shards)} under {summary.output / 'shards'}")
    print("open them:")
    print("  import webdataset as wds")
    last = f"{max(len(shards) - 1, 0):06d}"
    print(f"  ds = wds.WebDataset('{summary.output / 'shards'}/{{000000..{last}}}.tar')")
    print("  sample = next(iter(ds))   # KEY.flac, KEY.0.jpg ..., KEY.json, KEY.txt")
    print(f"index:       {summary.output / 'index.parquet'}  (pandas.read_parquet)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.bench import format_table, run_bench
    from pipeline.samples import parse_size

    try:
        size = parse_size(args.size)
    except ValueError as exc:
        raise SystemExit(f"avforge bench: {exc}") from None
    results = run_bench(
        Path(args.workdir), count=args.count, scales=args.scales, backend=args.backend, size=size, overrides=args.set
    )
    print(format_table(results))
    print(f"full results: {Path(args.workdir) / 'bench.json'}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.inspect import describe

    print(describe(args.path, samples=args.samples, key=args.key))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.config import ReportConfig
    from pipeline.report import write_report

    given = {"gallery_size": args.gallery, "lowest": args.lowest, "rejected": args.rejected, "seed": args.seed}
    cfg = ReportConfig(**{k: v for k, v in given.items() if v is not None})
    print(f"report: {write_report(args.dir, cfg)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avforge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline on an input LIST into an output DIR (resumes)")
    run.add_argument("--input", required=True, type=Path, help="txt/csv/jsonl/parquet list of URLs or paths")
    run.add_argument("--output", required=True, type=Path, help="output folder")
    run.add_argument("--config", type=Path, help="YAML config file")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. split.mode=shots")
    run.add_argument("--address", help="Ray cluster address (default: start Ray in-process)")
    run.add_argument("--backend", choices=["ray", "sequential"], default="ray", help="sequential: no Ray, in-process")
    run.add_argument("--dry-run", action="store_true", help="validate config and inputs, process nothing")
    run.set_defaults(func=_cmd_run)

    samples = sub.add_parser("samples", help="generate a small synthetic corpus (videos + true transcripts and cuts)")
    samples.add_argument("dir", type=Path)
    samples.add_argument("--count", type=int, default=6)
    samples.add_argument("--seed", type=int, default=0)
    samples.add_argument("--duration", type=float, default=8.0, help="typical video length in seconds")
    samples.add_argument("--size", default="320x240", help="frame size, WxH (even numbers)")
    samples.add_argument("--base-url", help="also write urls.txt with this URL prefix (for serving over HTTP)")
    samples.set_defaults(func=_cmd_samples)

    demo = sub.add_parser("demo", help="generate samples, serve them on 127.0.0.1 and run the pipeline on them")
    demo.add_argument("--dir", type=Path, default=Path("demo"))
    demo.add_argument("--count", type=int, default=6)
    demo.add_argument("--config", type=Path)
    demo.add_argument("--set", action="append", metavar="KEY=VALUE")
    demo.add_argument("--backend", choices=["ray", "sequential"], default="ray")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="benchmark the pipeline against an ffmpeg decode floor")
    bench.add_argument("--workdir", type=Path, default=Path("/tmp/avforge-bench"))
    bench.add_argument("--count", type=int, default=8, help="videos in the 1x corpus")
    bench.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    bench.add_argument("--backend", choices=["ray", "sequential"], default="ray")
    bench.add_argument("--size", default="1280x720", help="frame size of the generated corpus, WxH")
    bench.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for the timed runs")
    bench.set_defaults(func=_cmd_bench)

    inspect = sub.add_parser("inspect", help="summarise an output folder or a shard tar, with a few samples")
    inspect.add_argument("path", type=Path, help="output folder or shards/NNNNNN.tar")
    inspect.add_argument("--key", help="show this one sample in full")
    inspect.add_argument("--samples", type=int, default=3, help="samples to show in the summary")
    inspect.set_defaults(func=_cmd_inspect)

    report = sub.add_parser("report", help="(re)write the HTML caption-quality report DIR/report/index.html")
    report.add_argument("dir", type=Path, help="output folder of a run")
    report.add_argument("--gallery", type=int, default=None, help="randomly sampled kept clips in the gallery (24)")
    report.add_argument("--lowest", type=int, default=None, help="lowest-scoring kept clips in the gallery (8)")
    report.add_argument("--rejected", type=int, default=None, help="sampled rejected clips in the gallery (12)")
    report.add_argument("--seed", type=int, default=None, help="seed of the gallery sample (0)")
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except AvforgeError as exc:
        print(f"avforge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("avforge: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
