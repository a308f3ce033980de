"""The checkpoint formats of ``python -m idmr_jax.convert``: each name maps to its family's import / export /
verify function (the family module owns the format; this table only names it).

Formats
    hf_blip2        transformers ``Blip2ForImageTextRetrieval`` (folder, or a state dict file with ``--config``
                    pointing at its config.json). Any other Blip2 class (``Blip2ForConditionalGeneration``,
                    ``Blip2Model``, ...) is imported as vision tower + query tokens + Q-Former; what that checkpoint
                    lacks (Q-Former text embeddings, projections, ITM head) is freshly initialised and listed.
                    Export writes ``model.safetensors`` + ``config.json`` (``temp`` is dropped: that class has none).
    lavis_blip2     a LAVIS BLIP-2 state dict (.pth / .safetensors; ``{"model": ...}`` wrappers are unwrapped).
                    The architecture comes from ``--config`` (an idmr_jax ``model_config.json``, a bare Blip2Config
                    dict in the same form, or a transformers Blip2 config.json) or else is inferred from the
                    tensor shapes: every size is read off a shape except the two head counts, which shapes do not
                    determine: the ViT gets 16 heads at width 1408 (EVA ViT-g) and width // 64 otherwise, the
                    Q-Former hidden // 64 (BERT-base: 12). Pass ``--config`` for anything else. Export writes
                    FOLDER/model.safetensors and the architecture as FOLDER/model_config.json.
    hf_clip_vision  transformers ``CLIPVisionModel`` folder (a full ``CLIPModel`` folder works too: its text tower
                    and projections are skipped) -> ViT (style "clip").
    hf_bert         transformers ``BertModel`` folder -> Q-Former with BLIP-2's bert-base initialisation: the
                    query FFN copies the text FFN, the cross-attention layers are fresh. BERT's token-type
                    embeddings and pooler are dropped. The learned query tokens are not part of a Q-Former
                    checkpoint (they belong to the BLIP-2 model), so there is no --num-query-tokens here.
    lavis_adafocal  the official AdaFocal (github HaHaJun1101/OACIR ``Blip2QformerOacirAdaFocal``; the vector-beta
                    and baseline classes for those configs): FOLDER/model.safetensors holds exactly its state
                    dict names and shapes, FOLDER/model_config.json the architecture (import reads it back
                    bit-exactly; without it the architecture comes from ``--config`` or the tensor shapes, as
                    lavis_blip2, the CRM's 8 heads being the official constant). Official tensors the port does
                    not train (``Qformer.cls.*``, the ``position_ids`` buffer, the ``[DEC]`` row of a 30522-token
                    vocabulary) get the documented values of ``idmr_jax.weights.adafocal``; the port's
                    ``itm_head`` has no official slot (left out on export, at init on import). A CRM whose head
                    count, FFN width or LayerNorm eps differs from the official encoder layer is refused. Load with
                    ``model.load_state_dict(safetensors.torch.load_file(".../model.safetensors"))``.
    hf_llava        transformers ``LlavaForConditionalGeneration`` folder (CLIP vision tower, Qwen2 or Llama text
                    model; the save_pretrained, llava-hf hub and in-memory key layouts) -> ``LlavaEmbedder``
                    (``idmr_jax.weights.llava``). Export writes the save_pretrained layout; LoRA factors are
                    merged into the LM kernels (``llava.export_lora_adapter`` writes a PEFT adapter). Verify
                    compares last hidden states, logits and the last-token embedding on image+text batches
                    (right and left padded) and a text-only batch, on real positions.
    hf_internvl     transformers ``InternVLForConditionalGeneration`` folder (InternViT, Qwen2 or Llama text model;
                    the save_pretrained and in-memory key layouts) -> ``InternVLEmbedder``
                    (``idmr_jax.weights.internvl``). Export writes the save_pretrained layout; LoRA factors are
                    merged (``internvl.export_lora_adapter`` writes a PEFT adapter). Verify compares last hidden
                    states, logits and the last-token embedding on batches whose images have 1 and 3 tiles (right
                    and left padded) and a text-only batch, on real positions.
    hf_qwen2vl      transformers ``Qwen2VLForConditionalGeneration`` folder (ViT with 2D RoPE and patch merger,
                    Qwen2 text model with M-RoPE; the save_pretrained/hub and in-memory key layouts) ->
                    ``Qwen2VLEmbedder`` (``idmr_jax.weights.qwen2vl``). Export writes the save_pretrained layout;
                    LoRA factors are merged (``qwen2vl.export_lora_adapter`` writes a PEFT adapter). Verify compares
                    last hidden states, logits and the last-token embedding on batches whose rows hold images of
                    different sizes (right and left padded) and a text-only batch, on real positions.
    jax_serving     (export only) DIR/query.jaxexport and DIR/target.jaxexport (``jax.export``, symbolic batch),
                    DIR/params.npz and DIR/serving.json (input / output names, shapes, dtypes): data only, no
                    code. Load with ``query_fn, target_fn = idmr_jax.serving.load(DIR)`` or a vendored copy of
                    that one file.
                    ``--platforms`` (default cpu,cuda,tpu) lists where the artifact may run.

Export sources: a converted model directory (``model_config.json`` + ``params/``, written by ``import``), a
training workdir of ``python -m idmr_jax.main`` (the latest step under ``checkpoints/``), or one step directory
``WORKDIR/checkpoints/<step>``. From a training checkpoint the model config is rebuilt from the saved training
config and only the params (trainable and frozen) are read, never the optimiser state
(``idmr_jax.weights.workdir``). ``hf_blip2`` / ``lavis_blip2`` of an AdaFocal model export its BLIP-2 part (the
CAAM params are listed and left out); a model whose vision encoder is not an EVA ViT (the demo's EfficientNet)
cannot be a BLIP-2 vision tower and is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from idmr_jax.models import lora as lora_lib
from idmr_jax.weights.conversion import ConvertError
from idmr_jax.weights import adafocal, internvl, internvl_verify, llava, llava_verify, qwen2vl, qwen2vl_verify, vit
from idmr_jax.weights.blip2 import convert as blip2_convert
from idmr_jax.weights.blip2 import verify as blip2_verify


@dataclasses.dataclass(frozen=True)
class Format:
    """One format's functions; None where the format has no such direction.

    load(src, ImportOptions) -> conversion.Imported; export(source, src, out, ExportOptions) -> written path,
    `source` an ``idmr_jax.weights.workdir.ModelSource``; verify(src, port=, dtype=, tol=, config=, batch=,
    text_len=, seed=) -> (max abs diff, {output: diff}).
    """

    load: Callable | None = None
    export: Callable | None = None
    verify: Callable | None = None


def with_lora_adapter(export: Callable, write_adapter: Callable) -> Callable:
    """An MLLM format's export that, with ``--lora-adapter``, writes the base model with its LoRA factors left out
    (not merged) to OUT and the LM's LoRA as a PEFT adapter to ``OUT/lora_adapter`` (``write_adapter(flat, cfg,
    folder)``): ``PeftModel.from_pretrained(Cls.from_pretrained(OUT), OUT/lora_adapter)``. Without it: the export
    as is (LoRA merged into the kernels)."""

    def run(source, src, out, opts):
        if not opts.lora_adapter:
            return export(source, src, out, opts)
        base, factors = lora_lib.split_flat(source.flat)
        if not factors:
            raise ConvertError(f"{src}: --lora-adapter, but the model has no LoRA factors")
        path = export(dataclasses.replace(source, flat=base), src, out, opts)
        write_adapter(source.flat, source.model_config, Path(out) / LORA_ADAPTER_DIR)
        return path

    return run


LORA_ADAPTER_DIR = "lora_adapter"
LORA_ADAPTER_FORMATS = ("hf_llava", "hf_internvl", "hf_qwen2vl")

FORMATS: dict[str, Format] = {
    "hf_blip2": Format(blip2_convert.import_hf_blip2, blip2_convert.export_hf_blip2, blip2_verify.verify),
    "lavis_blip2": Format(blip2_convert.import_lavis_blip2, blip2_convert.export_lavis_blip2),
    "hf_clip_vision": Format(vit.import_hf_clip_vision),
    "hf_bert": Format(blip2_convert.import_hf_bert),
    "lavis_adafocal": Format(adafocal.import_lavis_adafocal, adafocal.export_lavis_adafocal),
    "jax_serving": Format(export=adafocal.export_jax_serving),
    "hf_llava": Format(llava.import_hf_llava, with_lora_adapter(llava.export_source, llava.export_lora_adapter),
                       llava_verify.verify_format),
    "hf_internvl": Format(internvl.import_hf_internvl,
                          with_lora_adapter(internvl.export_source, internvl.export_lora_adapter),
                          internvl_verify.verify_format),
    "hf_qwen2vl": Format(qwen2vl.import_hf_qwen2vl,
                         with_lora_adapter(qwen2vl.export_source, qwen2vl.export_lora_adapter),
                         qwen2vl_verify.verify_format),
}


def export_format(fmt: str, source, src, out, options):
    """``FORMATS[fmt].export`` with `options` checked against the format (``lora_adapter`` only where there is one)."""
    if options.lora_adapter and fmt not in LORA_ADAPTER_FORMATS:
        raise ConvertError(f"--lora-adapter: only {', '.join(LORA_ADAPTER_FORMATS)} write PEFT adapters")
    return FORMATS[fmt].export(source, src, out, options)


def names_with(direction: str) -> tuple[str, ...]:
    """The format names that have a `direction` ("load", "export" or "verify") function, in table order."""
    return tuple(name for name, fmt in FORMATS.items() if getattr(fmt, direction) is not None)
