"""`recap train` and `recap sample`: parse arguments, call one library function. torch and Ray are imported inside
the handlers so `recap --help` stays fast. Wire in with `trainer.cli.add_commands(subparsers)`; each parser sets
`handler`, called as `args.handler(args) -> int`."""

from __future__ import annotations

import argparse


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="training YAML (e.g. configs/train-tiny.yaml; default: built-in defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set optim.lr=3e-4 (repeatable)",
    )
    p.add_argument(
        "--data",
        "-d",
        nargs="+",
        required=True,
        help="a corpus directory (or its manifest), a directory of shards, a glob, a brace pattern or shard URLs",
    )
    p.add_argument(
        "--output",
        "-o",
        required=True,
        help="run directory, a path or an fsspec URI (file://, s3://, ...): metrics.jsonl, checkpoints/ (resumed if "
        "present)",
    )
    p.add_argument("--steps", type=int, help="optimizer steps of the run (sets train.steps, the LR schedule's length)")
    p.add_argument("--stop-at", type=int, help="stop after this many steps without changing the schedule (preemption)")
    p.add_argument("--ray", action="store_true", help="run on Ray Train workers (local Ray, --address or RAY_ADDRESS)")
    p.add_argument("--num-workers", type=int, default=1, help="with --ray: number of training workers")
    p.add_argument("--use-gpu", action="store_true", help="with --ray: one GPU per worker")
    p.add_argument("--address", help="with --ray: Ray cluster address")


def handle_train(args: argparse.Namespace) -> int:
    from trainer.config import load_train_config

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    config = load_train_config(args.config, overrides)
    data = args.data[0] if len(args.data) == 1 else args.data
    if args.ray:
        from trainer.train import run_ray

        summary = run_ray(config, data, args.output, args.num_workers, args.use_gpu, args.stop_at, args.address)
    else:
        from trainer.train import train

        summary = train(config, data, args.output, stop_at=args.stop_at)
    print(f"recap train: step {summary['step']}, loss {summary['loss']:.4f}; run in {summary['run_dir']}")
    return 0


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint (a .pt file or a sharded step-N/ directory) or a run directory (its latest); paths or URIs",
    )
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--output", "-o", default="sample.mp4", help="mp4 to write")
    p.add_argument("--steps", type=int, help="ODE steps (default: the config's sample.steps)")
    p.add_argument(
        "--cfg-scale", "--guidance", dest="cfg_scale", type=float, help="text guidance scale; 1 disables it"
    )
    p.add_argument(
        "--frame-guidance",
        type=float,
        help="guidance scale of the given frames (--image, --video; default: the config's sample.frame_cfg_scale)",
    )
    p.add_argument("--image", help="a still image as the first frame (image-to-video)")
    p.add_argument("--end-image", help="with --image: a still image as the last frame (interpolation)")
    p.add_argument("--video", help="a clip to continue: its last frames are given (needs --extend)")
    p.add_argument("--extend", type=float, metavar="SECONDS", help="with --video: seconds to add after the clip")
    p.add_argument(
        "--context-frames", type=int, help="with --video: how many of its last frames to give (default: half a clip)"
    )
    p.add_argument("--shift", type=float, help="timestep shift")
    p.add_argument("--seed", type=int)
    p.add_argument("--fps", type=float)
    p.add_argument("--frames", type=int, help="output frames (default: the training latents' most common length)")
    p.add_argument("--height", type=int, help="output height in pixels (a multiple of the VAE's spatial factor)")
    p.add_argument("--width", type=int)
    p.add_argument("--vae", help="VAE spec (default: the corpus's, from the checkpoint); must be the same weights")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--upsample-model", help="rewrite the prompt first with this causal LM (captioner.upsample)")


def handle_sample(args: argparse.Namespace) -> int:
    import logging

    from trainer.sample import sample_video

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    result = sample_video(
        args.checkpoint,
        args.prompt,
        args.output,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        frame_cfg_scale=args.frame_guidance,
        shift=args.shift,
        seed=args.seed,
        fps=args.fps,
        frames=args.frames,
        height=args.height,
        width=args.width,
        vae=args.vae,
        use_ema=not args.no_ema,
        device=args.device,
        upsample_model=args.upsample_model,
        image=args.image,
        end_image=args.end_image,
        video=args.video,
        extend=args.extend,
        context_frames=args.context_frames,
    )
    print(f"recap sample: {result.path} ({result.frames} frames, {result.width}x{result.height})")
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a sharded step-N/ checkpoint, a .pt file or a run directory (its latest)")
    p.add_argument("--output", "-o", required=True, help=".pt file to write (a path or an fsspec URI)")


def handle_export(args: argparse.Namespace) -> int:
    from trainer.checkpoint import export_checkpoint

    source = export_checkpoint(args.checkpoint, args.output)
    print(f"recap export-checkpoint: {source} -> {args.output}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a diffusion transformer on a corpus's shards (torchrun / --ray to scale out)"
    )
    add_train_arguments(p)
    p.set_defaults(handler=handle_train)
    p = subparsers.add_parser(
        "sample", help="sample a video from a training checkpoint for a prompt (and a still, two stills or a clip)"
    )
    add_sample_arguments(p)
    p.set_defaults(handler=handle_sample)
    p = subparsers.add_parser(
        "export-checkpoint", help="write one .pt file (weights, EMA, config) from a sharded training checkpoint"
    )
    add_export_arguments(p)
    p.set_defaults(handler=handle_export)
