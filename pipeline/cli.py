"""The ``avforge`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AvforgeError, ConfigError

if TYPE_CHECKING:
    from pipeline.config import RunConfig

log = logging.getLogger("avforge")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def check_output_dir(output: Path | str, option: str = "--output") -> None:
    """Refuse (ConfigError, exit 2) a local output path that is a file or lies under one.

    Object-store URLs (``s3://...``) are left to the storage layer."""
    from pipeline.config import echo

    text = str(output)
    if "\x00" in text:
        raise ConfigError(f"{option} {echo(text)} holds a NUL character")
    if "://" in text:
        return
    path = Path(text).expanduser()
    for candidate in (path, *path.parents):
        try:
            if candidate.exists() and not candidate.is_dir():
                what = "is an existing file" if candidate == path else f"lies under {echo(str(candidate))}, a file"
                raise ConfigError(f"{option} {echo(text)} {what}; give a folder")
        except (OSError, ValueError) as exc:  # ENAMETOOLONG and friends; ValueError: a NUL byte
            raise ConfigError(f"{option} {echo(text)}: {getattr(exc, 'strerror', None) or exc}") from None


def _run_config(args: argparse.Namespace, extra: list[str] | None = None) -> RunConfig:
    """The run config from the command line: recipe, --config files in order, then --set."""
    from pipeline.config import DEFAULT_RECIPE, load_config

    overrides = [*(extra or []), *(args.set or [])]
    if getattr(args, "address", None):
        overrides.append(f"ray.address={args.address}")
    return load_config(args.config or [], overrides, recipe=args.recipe or DEFAULT_RECIPE)


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.runner import run_pipeline

    config = _run_config(args)
    check_output_dir(args.output)
    if args.dry_run:
        from pipeline.runner import dry_run

        report = dry_run(args.input, config)
        print(f"config OK; stages: {', '.join(report['stages'])}")
        print(f"inputs: {report['inputs']}")
        for outcome, n in sorted(report["outcomes"].items(), key=lambda kv: -kv[1]):
            example = report["examples"].get(outcome)
            print(f"  {outcome:<28} {n:>8}" + (f"   e.g. {example}" if example else ""))
        return 0
    if args.dedup_against and "dedup" not in config.stages:
        raise ConfigError("--dedup-against needs the dedup stage in stages")
    summary = run_pipeline(args.input, args.output, config, backend=args.backend, retry_errors=args.retry_errors,
                           dedup_against=args.dedup_against or ())  # fmt: skip
    print("\n".join(["", "avforge run finished", *summary.lines()]))
    print(f"shards:      {summary.output / 'shards'}  (open with webdataset: see README 'Reading the output')")
    return 0


def _cmd_samples(args: argparse.Namespace) -> int:
    from pipeline.tools.samples import generate_corpus, parse_size

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
    """Generate samples, serve them on 127.0.0.1 (yt-dlp path), run a recipe (mmtrail: the whole
    pipeline) on them, and show what it made for a few clips."""
    from pipeline.runner import run_pipeline
    from pipeline.tools.samples import generate_corpus
    from pipeline.tools.serve import serve_directory

    root = Path(args.dir).resolve()
    check_output_dir(root, "--dir")
    # the samples are served on loopback, which downloads refuse unless allowed
    config = _run_config(args, ["download.allowed_hosts=[127.0.0.1]"])
    samples = root / "samples"
    if not (samples / "manifest.jsonl").exists():
        generate_corpus(samples, count=args.count, seed=0, duration=args.duration)
    names = sorted(p.name for p in samples.glob("sample_*.mp4"))[: args.count]
    with serve_directory(samples) as base:
        inputs = root / "urls.txt"
        inputs.write_text("".join(f"{base}/{n}\n" for n in names))
        log.info("serving %d sample videos at %s; recipe %s", len(names), base, config.recipe)
        summary = run_pipeline(inputs, root / "out", config, backend=args.backend)
    out = summary.output
    shards = sorted((out / "shards").glob("*.tar"))
    print("\n".join(["", f"avforge demo finished (recipe {config.recipe}: {', '.join(config.stages)})", *summary.lines()]))
    print(f"shards:      {len(shards)} under {out / 'shards'}")
    for line in demo_samples(out, args.show):
        print(line)
    print("open them:")
    print("  import glob, webdataset as wds")
    print(f"  ds = wds.WebDataset(sorted(glob.glob('{out / 'shards'}/*.tar')))  # names: partition-digest")
    print("  sample = next(iter(ds))   # KEY.flac, KEY.0.jpg ..., KEY.json, KEY.txt")
    print(f"index:       {out / 'index.parquet'}  (pandas.read_parquet)")
    report = out / "report" / "index.html"
    if report.exists():
        print(f"report:      {report}")
    return 0


def _wrap(label: str, text: str, width: int = 100) -> list[str]:
    lead = f"  {label:<12} "
    lines = textwrap.wrap(" ".join(text.split()), width - len(lead)) or [""]
    return [lead + lines[0], *(" " * len(lead) + ln for ln in lines[1:])]


def demo_samples(out: Path, count: int = 3) -> list[str]:
    """For up to ``count`` kept clips of a finished run: key, transcript, tags, captions, scores."""
    import pyarrow.parquet as pq

    index = out / "index.parquet"
    if count <= 0 or not index.exists():
        return []
    rows: list[dict[str, Any]] = pq.read_table(index).to_pylist()
    if not rows:
        return ["no clip was kept: see rejects.parquet and errors.parquet (avforge inspect)"]
    # one clip per video first, so the few shown differ
    seen: set[str] = set()
    chosen = [r for r in rows if not (r.get("video_id") in seen or seen.add(r.get("video_id")))][:count]
    lines = [f"{len(chosen)} of {len(rows)} kept clips:"]
    for r in chosen:
        lines.append(f"- {r['key']}  ({r.get('clip_start') or 0:.1f}-{r.get('clip_end') or 0:.1f} s of {r['source_url']})")
        lines += _wrap("transcript", r.get("transcript") or "(no speech)")
        for name in ("audio_tags", "visual_tags"):
            tags = r.get(name) or []
            if tags:
                lines += _wrap(name.replace("_", " "), ", ".join(f"{t['label']} {t['score']:.2f}" for t in tags[:6]))
        for c in r.get("captions") or []:
            if c.get("text"):
                lines += _wrap(f"[{c['kind']}]", f"{c['text']}  ({c.get('model')})")
        lines += _wrap("KEY.txt", r.get("caption") or "(none)")
        scores = ", ".join(f"{s['name']} {s['value']:.2f}" for s in r.get("scores") or [])
        if scores:
            lines += _wrap("scores", scores)
    return lines


def _cmd_recipes(args: argparse.Namespace) -> int:
    from pipeline.config import DEFAULT_RECIPE, recipe_description, recipe_names, recipe_text

    if args.name:
        print(recipe_text(args.name), end="")
        return 0
    names = recipe_names()
    width = max(len(n) for n in names) + 2
    for name in names:
        mark = " (default)" if name == DEFAULT_RECIPE else ""
        print(f"{name:<{width}}{recipe_description(name)}{mark}")
    print("\nrun one:  avforge run --recipe NAME --input LIST --output DIR [--config FILE ...] [--set KEY=VALUE ...]")
    print("show one: avforge recipes NAME")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.tools.bench import format_table, run_bench
    from pipeline.tools.samples import parse_size

    if args.quality:  # the quality benchmark (tests/bench/quality_bench.py): planted truth, full pipeline
        from pipeline.tools.bench import run_quality_bench

        workdir = Path(args.workdir or "/tmp/avforge-quality")
        _, summary = run_quality_bench(
            workdir, count=args.count or 16, duplicates=args.duplicates, bad=args.bad, seed=args.seed,
            backend=args.backend or "sequential", overrides=args.set, skip_wer=args.skip_wer,
            evaluate_only=args.evaluate_only, seconds=args.seconds,
        )  # fmt: skip
        print(summary)
        print(f"full results: {workdir / 'quality.json'}")
        return 0
    args.workdir = args.workdir or Path("/tmp/avforge-bench")
    args.count = args.count or 8
    args.backend = args.backend or "ray"
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
    from pipeline.tools.inspect import describe

    print(describe(args.path, samples=args.samples, key=args.key))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.config import ReportConfig
    from pipeline.tools.report import write_report

    given = {"gallery_size": args.gallery, "lowest": args.lowest, "rejected": args.rejected, "seed": args.seed}
    cfg = ReportConfig(**{k: v for k, v in given.items() if v is not None})
    print(f"report: {write_report(args.dir, cfg)}")
    return 0


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe", help="start from this recipe (avforge recipes lists them; default: mmtrail, the whole pipeline)"
    )
    parser.add_argument(
        "--config", type=Path, action="append", metavar="FILE.yaml",
        help="YAML config applied on top of the recipe; repeat to merge several, left to right (e.g. infra/gpu.yaml)",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config value last, e.g. split.mode=shots"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avforge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline on an input LIST into an output DIR (resumes)")
    run.add_argument("--input", required=True, type=Path, help="txt/csv/jsonl/parquet list of URLs or paths")
    run.add_argument("--output", required=True, type=Path, help="output folder")
    _config_args(run)
    run.add_argument("--address", help="Ray cluster address (default: start Ray in-process)")
    run.add_argument("--backend", choices=["ray", "sequential"], default="ray", help="sequential: no Ray, in-process")
    run.add_argument("--dry-run", action="store_true", help="validate config and inputs, process nothing")
    run.add_argument("--retry-errors", action="store_true",
                     help="also retry inputs that failed transiently (rate limits, timeouts, 5xx) in earlier runs")
    run.add_argument("--dedup-against", nargs="+", metavar="DIR", default=[],
                     help="earlier outputs (local or object store): new clips that repeat their clips are dropped as "
                     "duplicate_of the earlier key; those outputs are never modified")
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
    demo.add_argument("--count", type=int, default=4, help="sample videos")
    demo.add_argument("--duration", type=float, default=8.0, help="typical sample length in seconds")
    demo.add_argument("--show", type=int, default=3, help="clips whose transcript, tags and captions are printed")
    _config_args(demo)
    demo.add_argument("--backend", choices=["ray", "sequential"], default="ray")
    demo.set_defaults(func=_cmd_demo)

    recipes = sub.add_parser("recipes", help="list the recipes (whole pipelines after known datasets), or show one")
    recipes.add_argument("name", nargs="?", help="print this recipe's YAML (its choices are in the comments)")
    recipes.set_defaults(func=_cmd_recipes)

    bench = sub.add_parser("bench", help="benchmark the pipeline against an ffmpeg decode floor")
    bench.add_argument("--workdir", type=Path, default=None, help="default /tmp/avforge-bench (--quality: /tmp/avforge-quality)")
    bench.add_argument("--count", type=int, default=None, help="videos in the 1x corpus (8); --quality: originals (16)")
    bench.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    bench.add_argument("--backend", choices=["ray", "sequential"], default=None, help="ray (--quality: sequential)")
    bench.add_argument("--size", default="1280x720", help="frame size of the generated corpus, WxH")
    bench.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for the timed runs")
    bench.add_argument("--quality", action="store_true",
                       help="the quality benchmark instead: dedup P/R, filter false drops, WER, grounding, judge AUC "
                       "on a generated corpus with planted truth (README 'Quality benchmark')")
    bench.add_argument("--duplicates", type=int, default=10, help="--quality: planted duplicates")
    bench.add_argument("--bad", type=int, default=7, help="--quality: planted bad videos")
    bench.add_argument("--seed", type=int, default=0, help="--quality: corpus seed")
    bench.add_argument("--seconds", type=float, default=20.0, help="--quality: length of each original video")
    bench.add_argument("--skip-wer", action="store_true", help="--quality: no whole-track ASR pass")
    bench.add_argument("--evaluate-only", action="store_true", help="--quality: evaluate WORKDIR/out as it is, no run")
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
        message = str(exc)
        if len(message) > 4000:  # messages echo bounded values, but never flood a terminal or a log
            message = message[:3999] + "\u2026"
        print(f"avforge: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("avforge: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
