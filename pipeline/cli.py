"""The `recap` command: parses arguments and calls one library function per subcommand.

Heavy modules (Ray, PyAV, torch) are imported inside the handlers so `recap --help` is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set split.detector=adaptive (repeatable)",
    )


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--force",
        action="store_true",
        help="re-run stages that already ran with other settings (later stages are marked for re-running); "
        "without it a changed config is refused and a re-run resumes where the last one stopped",
    )
    p.add_argument(
        "--break-lease",
        action="store_true",
        help="take OUT's writer lease even though another run holds it (only when that run is dead)",
    )


def _stage_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recap", description="Turn raw video into re-captioned, latent-encoded training corpora."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run several stages in order (default: all that exist)")
    _add_config_args(p)
    _add_ray_args(p)
    p.add_argument("--input", "-i", nargs="+", help="video files, directories, globs or fsspec URIs")
    p.add_argument("--output", "-o", required=True, help="corpus directory or URI")
    p.add_argument("--stages", type=_stage_list, help="comma-separated: ingest,split,filter,caption,encode")
    p.add_argument(
        "--retry-rejected",
        type=_stage_list,
        metavar="REASONS",
        help="process again the videos an earlier run rejected for these reasons, e.g. decoder_crash,decode_timeout "
        "(only those; everything else stays as it is)",
    )

    p = sub.add_parser("ingest", help="find and probe input videos; write the videos table")
    _add_config_args(p)
    _add_ray_args(p)
    p.add_argument("--input", "-i", nargs="+", required=True, help="video files, directories, globs or fsspec URIs")
    p.add_argument("--output", "-o", required=True)

    p = sub.add_parser("split", help="detect scenes in ingested videos; write the clips table")
    _add_config_args(p)
    _add_ray_args(p)
    p.add_argument("--output", "-o", required=True, help="corpus written by `recap ingest`")

    p = sub.add_parser("filter", help="score clips, remove near-duplicates, decide pass/reject")
    _add_config_args(p)
    _add_ray_args(p)
    p.add_argument("--output", "-o", required=True, help="corpus written by `recap split`")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print how many clips each threshold would reject; write nothing (re-uses stored scores)",
    )

    p = sub.add_parser("caption", help="caption passing clips with a video-language model")
    _add_config_args(p)
    _add_ray_args(p)
    p.add_argument("--output", "-o", required=True, help="corpus with a clips table (after split/filter)")

    p = sub.add_parser("encode", help="encode passing clips to VAE latents and write WebDataset shards")
    _add_config_args(p)
    _add_ray_args(p)
    p.add_argument("--output", "-o", required=True, help="corpus with a clips table")

    p = sub.add_parser("upsample", help="rewrite short prompts as long captions in the corpus's caption style")
    _add_config_args(p)
    p.add_argument("prompts", nargs="+", help="short prompts, e.g. 'a corgi surfing'")
    p.add_argument("--corpus", help="captioned corpus to draw few-shot examples from and compare styles with")
    p.add_argument("--model", help="override upsample.model")

    p = sub.add_parser("manifest", help="inspect and check a corpus's manifest and shards")
    msub = p.add_subparsers(dest="manifest_command", required=True, metavar="ACTION")
    val = msub.add_parser("validate", help="check every shard against the manifest; exit 1 on any mismatch")
    val.add_argument("output", help="corpus directory or URI")
    val.add_argument("--quick", action="store_true", help="skip loading every sample (sizes, hashes, keys only)")
    stats = msub.add_parser("stats", help="the funnel, rejects by reason, score quantiles, hours, shard sizes")
    stats.add_argument("output")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    show = msub.add_parser("show", help="print rows of a table")
    show.add_argument("output")
    show.add_argument("table", choices=["videos", "clips", "captions", "samples", "shards", "rejects"])
    show.add_argument("--columns", help="comma-separated columns")
    show.add_argument(
        "--where", help='row filter (pandas query), e.g. "passed and score_motion > 2" or "reason == \'too_short\'"'
    )
    show.add_argument("--limit", type=int, default=20)
    one = msub.add_parser("sample", help="one sample's caption and metadata; --write decodes its latents to a file")
    one.add_argument("output")
    one.add_argument("key", help="the sample key (= clip_id)")
    one.add_argument("--write", metavar="PATH", help="write the decoded frames: .mp4 video or .png/.jpg frame grid")
    one.add_argument("--device", default="cpu", help="device for the VAE decoder (cpu, cuda)")

    p = sub.add_parser("report", help="write a static HTML report of a corpus to OUT/report/index.html")
    p.add_argument("output", help="corpus directory (local)")
    p.add_argument("--plan", type=float, metavar="HOURS_OF_VIDEO", help="project time and storage for this much video")
    p.add_argument("--gpus", type=int, default=0, help="GPUs of the cluster for --plan (default 0)")
    p.add_argument("--cpus", type=int, help="CPUs of the cluster for --plan (default: this machine's)")
    p.add_argument("--no-thumbnails", action="store_true", help="skip decoding frames for the gallery's strips")

    from trainer.cli import add_commands as add_trainer_commands  # argparse only: keeps `recap --help` fast

    add_trainer_commands(sub)  # `recap train`, `recap sample`

    p = sub.add_parser("config", help="show the resolved config")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print the config with every default filled in")
    _add_config_args(show)

    p = sub.add_parser("samples", help="generate short sample videos with known cuts")
    p.add_argument("output_dir")

    p = sub.add_parser("quickstart", help="generate sample videos (or take --input) and run the pipeline on them")
    _add_config_args(p)
    _add_ray_args(p)
    p.add_argument("--input", "-i", nargs="+", help="your own videos instead of generated samples")
    p.add_argument("--output", "-o", default="quickstart-out")
    return parser


def _load(args: argparse.Namespace) -> Any:
    from pipeline.config import load_config

    return load_config(args.config, args.overrides)


# The unit each stage's throughput is counted in (a key of its counts).
_RATE_UNITS = {"ingest": "files", "split": "frames", "filter": "clips", "caption": "clips", "encode": "samples"}


def _print_summary(results: list[Any], output: str) -> None:
    from pipeline import manifest

    print(f"\nrecap finished: {output}")
    for result in results:
        unit = _RATE_UNITS.get(result.stage)
        done = result.counts.get(unit or "", 0)
        rate = (
            f"  [{done / result.seconds:,.1f} {unit}/s]" if done and result.seconds > 0 and not result.skipped else ""
        )
        print("  " + result.summary_line() + rate)
        for reason, count in result.info.get("skipped", {}).items():
            print(f"    skipped {count:,} file(s): {reason}")
    this_run = sum(sum(r.rejects_by_reason.values()) for r in results if not r.skipped)
    if results and not any(r.stage.endswith("(dry run)") for r in results):
        # The corpus's counts, the same as `recap manifest stats` and the report.
        stats = manifest.corpus_stats(output)
        recorded = sum(stats["rejects"].values())
        print(
            f"  rejects recorded: {recorded:,} ({this_run:,} by this run; see {output.rstrip('/')}/manifest/rejects)"
        )
        print("  funnel: " + " -> ".join(f"{k} {v:,}" for k, v in stats["funnel"].items()))
        for key, count in sorted(stats["rejects"].items(), key=lambda kv: -kv[1]):
            print(f"    rejected {key}: {count:,}")
        if stats["stale"]:
            print("  " + manifest.stale_note(stats["stale"]))


def _health(config: Any, output: str) -> int:
    """0, or the configured exit code after one loud line when too many inputs hit a crashed or hung decoder."""
    from pipeline.runner import decoder_failure_alarm

    alarm = decoder_failure_alarm(config, output)
    if alarm is None:
        return 0
    print(f"\n{alarm}", file=sys.stderr)
    return config.isolation.decoder_failure_exit_code


@contextlib.contextmanager
def _writer_lease(args: argparse.Namespace, config: Any) -> Iterator[Any]:
    """Hold OUT's writer lease for this command: refused (LeaseHeld, exit 4) while another run holds it."""
    import shlex

    from pipeline.lease import WriterLease

    lease = WriterLease(
        args.output,
        "recap " + shlex.join(args.argv),
        timeout_s=config.lease.timeout_s,
        heartbeat_s=config.lease.heartbeat_s,
        break_lease=args.break_lease,
    )
    with lease:
        if lease.taken_over:
            print(f"recap: {lease.taken_over}", file=sys.stderr)
        yield lease


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.runner import run_pipeline

    config = _load(args)
    with _writer_lease(args, config) as lease:
        results = run_pipeline(
            config,
            args.output,
            inputs=args.input,
            stages=args.stages,
            address=args.address,
            force=args.force,
            retry_rejected=args.retry_rejected,
            lease=lease,
        )
        _print_summary(results, args.output)
    return _health(config, args.output)


def _cmd_stage(args: argparse.Namespace) -> int:
    from pipeline.runner import run_pipeline

    config = _load(args)
    inputs = getattr(args, "input", None)
    with _writer_lease(args, config) as lease:
        results = run_pipeline(
            config,
            args.output,
            inputs=inputs,
            stages=[args.command],
            address=args.address,
            force=args.force,
            lease=lease,
        )
        _print_summary(results, args.output)
    return _health(config, args.output)


def _cmd_filter(args: argparse.Namespace) -> int:
    from pipeline.runner import run_pipeline

    config = _load(args)
    if not args.dry_run:
        with _writer_lease(args, config) as lease:
            results = run_pipeline(
                config, args.output, stages=["filter"], address=args.address, force=args.force, lease=lease
            )
            _print_summary(results, args.output)
        return 0
    # A dry run writes nothing to OUT: a reader, it takes no lease and runs beside a writer.
    results = run_pipeline(config, args.output, stages=["filter"], address=args.address, dry_run=True)
    result = results[0]
    considered = result.counts["considered"]
    print(f"\nfilter --dry-run on {args.output}: {result.counts['clips']} clips, {considered} not already rejected")
    print(f"  {'reason':<18} {'would reject':>12} {'share':>7}")
    for reason, count in sorted(result.rejects_by_reason.items(), key=lambda kv: -kv[1]):
        share = 100 * count / considered if considered else 0.0
        print(f"  {reason:<18} {count:>12} {share:6.1f}%")
    if not result.rejects_by_reason:
        print("  (no threshold rejects anything)")
    print("  nothing written")
    return 0


def _cmd_upsample(args: argparse.Namespace) -> int:
    from captioner.upsample import Upsampler, corpus_captions, style_report

    cfg = _load(args).upsample
    captions = corpus_captions(args.corpus) if args.corpus else []
    upsampler = Upsampler(
        args.model or cfg.model, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code
    )
    results = upsampler.upsample(
        args.prompts, captions, n_examples=cfg.examples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature
    )
    for prompt, text in zip(args.prompts, results, strict=True):
        print(f"{prompt}\n  -> {text}\n")
    if captions:
        for line in style_report(results, captions).lines():
            print(line)
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    if args.manifest_command == "validate":
        from pipeline.shards.validate import validate_corpus

        problems = validate_corpus(args.output, check_samples=not args.quick)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        if problems:
            print(f"recap: manifest validate: {len(problems)} problem(s) in {args.output}", file=sys.stderr)
            return 1
        print(f"{args.output}: every shard matches the manifest")
        from pipeline import manifest

        stale = manifest.stale_stages(args.output)
        if stale:
            print(f"  note: {manifest.stale_note(stale)}")
        return 0
    from pipeline import manifest

    if args.manifest_command == "stats":
        import json

        stats = manifest.corpus_stats(args.output)
        if args.json:
            print(json.dumps(stats, indent=2))
            return 0
        print("funnel: " + " -> ".join(f"{k} {v:,}" for k, v in stats["funnel"].items()))
        print("hours:  " + ", ".join(f"{k} {v:.2f}" for k, v in stats["hours"].items()))
        for key, count in sorted(stats["rejects"].items(), key=lambda kv: -kv[1]):
            print(f"  rejected {key}: {count}")
        if stats["stale"]:
            print(manifest.stale_note(stats["stale"]))
        for name, q in {
            **stats["scores"],
            "caption_words": stats.get("caption_words", {}),
            "shard_bytes": stats.get("shard_bytes", {}),
        }.items():
            if q:
                print(f"  {name:<22} " + "  ".join(f"{k} {v:.3g}" for k, v in q.items()))
        return 0
    if args.manifest_command == "sample":
        return _show_sample(args)
    columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
    frame = manifest.read_table(args.output, args.table).to_pandas()
    total = len(frame)
    if args.where:
        try:
            frame = frame.query(args.where, engine="python")
        except Exception as exc:  # pandas raises many kinds for a bad expression: report it, not a traceback
            print(f"recap: --where {args.where!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
            print(f"  columns of {args.table}: {', '.join(frame.columns)}", file=sys.stderr)
            return 2
    if columns:
        unknown = [c for c in columns if c not in frame.columns]
        if unknown:
            print(
                f"recap: --columns: no {', '.join(unknown)} in {args.table}; have {', '.join(frame.columns)}",
                file=sys.stderr,
            )
            return 2
        frame = frame[columns]
    print(frame.head(args.limit).to_string(max_colwidth=60))
    print(f"({min(args.limit, len(frame))} of {len(frame)} matching rows; {total} in {args.table})")
    return 0


def _show_sample(args: argparse.Namespace) -> int:
    import json

    from pipeline.shards.reader import SampleNotFound, read_sample, write_sample_preview

    try:
        sample = (
            write_sample_preview(args.output, args.key, args.write, device=args.device)
            if args.write
            else read_sample(args.output, args.key)
        )
    except (SampleNotFound, ValueError) as exc:
        print(f"recap: manifest sample: {exc}", file=sys.stderr)
        return 1
    print(f"key:     {sample['__key__']}  (shard {sample['shard']})")
    print(f"caption: {sample.get('txt', '')}")
    for name, value in sorted(sample.items()):
        if name.endswith(".npy"):
            print(f"{name:<13} {value.dtype} {tuple(value.shape)}")
    print("metadata:")
    print(json.dumps(sample.get("json", {}), indent=2, sort_keys=True))
    if args.write:
        print(f"decoded {tuple(sample['decoded_shape'])} frames -> {args.write}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    print(_load(args).to_yaml(), end="")
    return 0


def _cmd_samples(args: argparse.Namespace) -> int:
    from pipeline.samples import generate_samples

    truth = generate_samples(args.output_dir)
    for name, cuts in truth.items():
        print(f"{args.output_dir.rstrip('/')}/{name}: cuts at frames {cuts}")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    import os

    from pipeline.runner import run_pipeline
    from pipeline.samples import generate_samples

    config = _load(args)
    inputs = args.input
    with _writer_lease(args, config) as lease:  # the sample videos are written into OUT too
        if not inputs:
            sample_dir = os.path.join(args.output, "samples")
            generate_samples(sample_dir)
            print(f"sample videos in {sample_dir} (generated where missing)")
            inputs = [sample_dir]
        results = run_pipeline(config, args.output, inputs=inputs, address=args.address, lease=lease)
        _print_summary(results, args.output)
    print(f"  tables: {args.output.rstrip('/')}/manifest/{{videos,clips,captions,rejects}} (Parquet)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import PlanRequest, build_report

    try:
        plan = (
            PlanRequest(args.plan, args.gpus, args.cpus if args.cpus is not None else os.cpu_count() or 1)
            if args.plan is not None
            else None
        )
        result = build_report(args.output, plan=plan, thumbnails=not args.no_thumbnails)
    except ValueError as exc:  # --plan/--gpus/--cpus out of range
        print(f"recap: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {result.path} ({result.clips:,} clips, {result.thumbnails:,} thumbnails, {result.seconds:.1f} s)")
    for line in result.plan.lines() if result.plan else []:
        print(line)
    return 0


_HANDLERS = {
    "run": _cmd_run,
    "ingest": _cmd_stage,
    "split": _cmd_stage,
    "filter": _cmd_filter,
    "caption": _cmd_stage,
    "upsample": _cmd_upsample,
    "encode": _cmd_stage,
    "manifest": _cmd_manifest,
    "config": _cmd_config,
    "samples": _cmd_samples,
    "quickstart": _cmd_quickstart,
    "report": _cmd_report,
}


# Storage failures stop a run with a message (not a traceback); committed work stays for a resume.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
# Another writer holds OUT: not an error in the data or the storage; wait, or --break-lease if it is dead.
EXIT_LEASE_HELD = 4  # another writer holds OUT (or took this run's lease over)
EXIT_WORKER_BROKEN = 6  # the decoding process cannot start on a worker: nothing rejected, resumable


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # `kill`, a Ray job stop or an orchestrator's timeout: unwind like Ctrl-C, so the writer lease is given back.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from pipeline.config import ConfigError
    from pipeline.errors import DecoderUnavailable, LeaseHeld, LeaseLost, StageInputError
    from pipeline.io.sources import InputError

    writer = getattr(args, "break_lease", None) is not None and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if writer else None
    try:
        handler = getattr(args, "handler", None) or _HANDLERS[args.command]
        return handler(args)
    except (ConfigError, InputError, StageInputError) as exc:
        print(f"recap: error: {exc}", file=sys.stderr)
        return 2
    except (LeaseHeld, LeaseLost) as exc:
        print(f"recap: {exc}", file=sys.stderr)
        return EXIT_LEASE_HELD
    except ValueError as exc:
        if any(flag in str(exc) for flag in ("--stages", "--input", "--retry-rejected")):
            print(f"recap: error: {exc}", file=sys.stderr)
            return 2
        raise
    except DecoderUnavailable as exc:  # a broken worker, not bad files: nothing was rejected for it
        print(f"recap: error: {exc}", file=sys.stderr)
        return EXIT_WORKER_BROKEN
    except KeyboardInterrupt:
        print("recap: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except OSError as exc:
        from pipeline.errors import StorageError

        if exc.errno not in _STORAGE_ERRNOS and not isinstance(exc, StorageError):
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"recap: error: {os.strerror(exc.errno)}{where}. Nothing committed was lost: fix the storage problem "
            "and re-run the same command to resume.",
            file=sys.stderr,
        )
        return 3
    finally:
        if writer:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
