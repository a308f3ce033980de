"""Checkpoint conversion between PyTorch (transformers, LAVIS) and idmr_jax's Flax ports.

Usage::

    # PyTorch -> converted Flax checkpoint (DIR/model_config.json + DIR/params, see idmr_jax.weights.io)
    python -m idmr_jax.convert import --format hf_blip2       --src HF_FOLDER_OR_STATE_DICT --out DIR
    python -m idmr_jax.convert import --format lavis_blip2    --src blip2_pretrained.pth [--config CFG.json] --out DIR
    python -m idmr_jax.convert import --format hf_clip_vision --src CLIP_FOLDER --out DIR
    python -m idmr_jax.convert import --format hf_bert        --src BERT_FOLDER --out DIR \
        [--cross-attention-freq 2] [--encoder-hidden-size 1408]
    python -m idmr_jax.convert import --format lavis_adafocal --src FOLDER --out DIR   # official AdaFocal
    python -m idmr_jax.convert import --format hf_llava|hf_internvl|hf_qwen2vl --src HF_FOLDER --out DIR

    # converted Flax checkpoint, training workdir (its latest step) or WORKDIR/checkpoints/<step> -> PyTorch
    python -m idmr_jax.convert export --format hf_blip2|lavis_blip2|lavis_adafocal|hf_llava|hf_internvl|hf_qwen2vl \
        --src DIR --out FOLDER [--lora-adapter]   # MLLMs: LoRA as a PEFT adapter in FOLDER/lora_adapter
    # trained AdaFocal -> jax.export serving artifact (loaded by idmr_jax/serving.py, no flax needed)
    python -m idmr_jax.convert export --format jax_serving --src WORKDIR --out DIR [--platforms cpu,cuda,tpu]

    # numerical parity of the Flax port against transformers on the same checkpoint
    python -m idmr_jax.convert verify --format hf_blip2|hf_llava|hf_internvl|hf_qwen2vl --src FOLDER [--port DIR] \
        [--dtype bfloat16] [--tol X]

The formats, and the family module that implements each, are described in ``idmr_jax.weights.formats``.
Exit codes: 0 success; 1 verify found a difference above the tolerance; 2 bad input (missing / unexpected /
misshapen tensors, a non-float tensor where a float is wanted, NaN / inf weights without --allow-nonfinite,
unreadable, truncated or unsafe files): a one-line message names the offending tensor or file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from idmr_jax.weights import io, workdir
from idmr_jax.weights.conversion import DEFAULT_TOL, ConvertError, ExportOptions, ImportOptions, log
from idmr_jax.weights.formats import FORMATS, LORA_ADAPTER_FORMATS, export_format, names_with
from idmr_jax.weights.mapping import WeightMismatchError

__all__ = ["ConvertError", "DEFAULT_TOL", "export_checkpoint", "import_checkpoint", "main"]


def import_checkpoint(fmt: str, src: str | Path, out: str | Path, options: ImportOptions | None = None) -> Path:
    """Converts a PyTorch checkpoint of format `fmt` to an idmr_jax checkpoint directory `out`."""
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"{src}: no such file or directory")
    imported = FORMATS[fmt].load(src, options or ImportOptions())
    extra = {"format": fmt, "path": str(src.absolute()), "freshly_initialised": imported.fresh}
    return io.save_model(out, imported.module, imported.config, kind=imported.kind, extra=extra)


def export_checkpoint(fmt: str, src: str | Path, out: str | Path, *, dtype: str | None = None,
                      drop_k_bias: bool = False, platforms: Sequence[str] | None = None,
                      lora_adapter: bool = False) -> Path:
    """Writes the model of `src` (a converted model directory, a training workdir or one of its checkpoint steps)
    in format `fmt` under folder `out`; see ``idmr_jax.weights.formats``."""
    try:
        source = workdir.read_source(src)
    except ValueError as e:  # e.g. a training config of another task, or one that does not match its params
        raise ConvertError(f"{src}: {e}") from e
    options = ExportOptions(dtype=dtype, drop_k_bias=drop_k_bias, platforms=platforms, lora_adapter=lora_adapter)
    return export_format(fmt, source, src, out, options)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m idmr_jax.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="PyTorch checkpoint -> idmr_jax (Orbax) checkpoint directory")
    imp.add_argument("--format", required=True, choices=names_with("load"))
    imp.add_argument("--src", required=True, help="checkpoint folder or state dict file")
    imp.add_argument("--out", required=True, help="output directory (model_config.json + params/)")
    imp.add_argument("--config", help="config JSON: transformers config.json for a bare state dict; "
                                      "for lavis_blip2 an idmr_jax/transformers BLIP-2 config (else inferred)")
    imp.add_argument("--param-dtype", choices=("float32", "bfloat16"), help="dtype the params are stored in "
                     "(default: the model config's, float32)")
    imp.add_argument("--cross-attention-freq", type=int, default=2, help="hf_bert: cross-attention every N layers")
    imp.add_argument("--encoder-hidden-size", type=int, default=1408,
                     help="hf_bert: width of the image tokens (1408 = EVA ViT-g)")
    imp.add_argument("--allow-missing-vision", action="store_true",
                     help="lavis_blip2: accept a checkpoint without visual_encoder.* (the ViT stays at init)")
    imp.add_argument("--seed", type=int, default=0, help="seed of freshly initialised params")
    imp.add_argument("--allow-nonfinite", action="store_true", help="accept NaN / inf weights (default: refused)")

    exp = sub.add_parser("export", help="idmr_jax checkpoint directory -> PyTorch checkpoint folder")
    exp.add_argument("--format", required=True, choices=names_with("export"))
    exp.add_argument("--src", required=True, help="directory written by `import`, a training workdir, or "
                                                  "WORKDIR/checkpoints/<step>")
    exp.add_argument("--out", required=True, help="output folder (model.safetensors [+ config.json])")
    exp.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast floating tensors")
    exp.add_argument("--drop-k-bias", action="store_true",
                     help="lavis_blip2 / lavis_adafocal: drop a nonzero EVA key bias (LAVIS has none; outputs "
                          "are unchanged)")
    exp.add_argument("--lora-adapter", action="store_true", help=f"{'/'.join(LORA_ADAPTER_FORMATS)}: the base "
                     "model without its LoRA and the LM's LoRA as a PEFT adapter in OUT/lora_adapter (else merged)")
    exp.add_argument("--platforms", type=lambda s: tuple(filter(None, s.split(","))),
                     help="jax_serving: comma-separated platforms to export for (default cpu,cuda,tpu)")

    ver = sub.add_parser("verify", help="parity of the Flax port against transformers on the same checkpoint")
    ver.add_argument("--format", required=True, choices=names_with("verify"))
    ver.add_argument("--src", required=True, help="transformers Blip2ForImageTextRetrieval folder or state dict")
    ver.add_argument("--config", help="transformers config.json, if --src is a bare state dict")
    ver.add_argument("--port", help="compare an `import` output directory instead of converting --src in memory")
    ver.add_argument("--dtype", choices=tuple(DEFAULT_TOL), default="float32", help="compute dtype of the port")
    ver.add_argument("--tol", type=float, help=f"max abs diff allowed (default {DEFAULT_TOL})")
    ver.add_argument("--batch", type=int, default=2)
    ver.add_argument("--text-len", type=int, default=8)
    ver.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 1 verify above tolerance, 2 bad input)."""
    args = _parser().parse_args(argv)
    t0 = time.time()
    try:
        if args.command == "import":
            options = ImportOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ImportOptions)})
            log(f"wrote {import_checkpoint(args.format, args.src, args.out, options)} ({time.time() - t0:.1f}s)")
        elif args.command == "export":
            out = export_checkpoint(args.format, args.src, args.out, dtype=args.dtype, drop_k_bias=args.drop_k_bias,
                                    platforms=args.platforms, lora_adapter=args.lora_adapter)
            log(f"wrote {out} ({time.time() - t0:.1f}s)")
        else:
            tol = DEFAULT_TOL[args.dtype] if args.tol is None else args.tol
            worst, _ = FORMATS[args.format].verify(args.src, port=args.port, dtype=args.dtype, tol=tol,
                                                   config=args.config, batch=args.batch, text_len=args.text_len,
                                                   seed=args.seed)
            ok = worst <= tol  # also False for NaN
            log(f"{'OK' if ok else 'FAIL'}: max_abs_diff {worst:.3e} {'<=' if ok else '>'} tol {tol:.1e}")
            # The contract: the last line, on stdout, is the worst difference.
            print(f"max_abs_diff={worst:.6e}", flush=True)
            if not ok:
                return 1
    except (WeightMismatchError, ConvertError, FileNotFoundError, FileExistsError) as e:
        log(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
