"""`dopr export CKPT --format torchscript|onnx --out FILE`: one self-contained policy file for a controller."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to a TorchScript or ONNX file",
        description="Write a checkpoint as one file that runs with torch or onnxruntime alone: inputs are the raw "
        "observation history per key (B, To, ...), output the executed actions (B, Ta, A); normalization is "
        "inside, and diffusion/flow policies get their sampling loop unrolled to a fixed number of steps with the "
        "noise as the input 'noise' (B, S, Tp, A). Run it with dopr.deploy.runtime.PolicyRunner.from_file.",
    )
    p.add_argument("checkpoint", help="checkpoint folder (config.json, ema.safetensors, meta.json, ...)")
    p.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript", help="file format")
    p.add_argument("--out", default=None,
                   help="output file (default: <checkpoint>/export/<run>-<checkpoint>[-raw][-Nsteps].pt or .onnx, "
                   "so exports of different runs, weights and step counts never share a name)")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    p.add_argument("--no-ema", action="store_true", help="export model.safetensors instead of the EMA weights")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps of diffusion/flow policies (default: the checkpoint's num_inference_steps)")
    p.set_defaults(func=main)


def default_export_path(ckpt, fmt: str, ema: bool = True, steps: int | None = None):
    """<checkpoint>/export/<run>-<checkpoint>[-raw][-Nsteps].<ext>: inside the checkpoint, as its eval/ is, and
    named after the run too, since a file copied to a controller leaves its folder behind."""
    from pathlib import Path

    ckpt = Path(ckpt).resolve()
    variant = ("" if ema else "-raw") + (f"-{steps}steps" if steps is not None else "")
    return ckpt / "export" / f"{ckpt.parent.name}-{ckpt.name}{variant}.{'onnx' if fmt == 'onnx' else 'pt'}"


def main(args) -> int:
    import sys
    from pathlib import Path

    from dopr.deploy.export import export_checkpoint

    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else default_export_path(ckpt, args.format, ema=not args.no_ema, steps=args.steps)
    if out.exists() and not args.overwrite:
        print(f"dopr export: error: {out} exists; pass --overwrite to replace it, or --out another file",
              file=sys.stderr)
        return 2
    try:
        path = export_checkpoint(ckpt, out, args.format, ema=not args.no_ema, num_inference_steps=args.steps)
    except (ValueError, RuntimeError, OSError) as err:  # CheckpointError is a RuntimeError
        print(f"dopr export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
