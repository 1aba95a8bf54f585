"""The study's artifacts in other tools' formats: a LoRA for AUTOMATIC1111 and ComfyUI, an embedding for A1111.

The study saves diffusers' formats (``nbutils.lora``, ``nbutils.textual_inversion``, ``nbutils.combos.save_pivotal``),
which only diffusers reads. The other tools read:

- a LoRA in kohya-ss's format (``export_lora_kohya``): per adapted layer ``lora_unet_<layer, "." as "_">.lora_down.
  weight`` (A, (r, in)), ``.lora_up.weight`` (B, (out, r)) and ``.alpha`` (0-d float32; the update is scaled by
  ``alpha / r``, as peft's ``lora_alpha / r``), text-encoder layers as ``lora_te_text_model_encoder_layers_<i>_...``.
  The names come from diffusers' own ``convert_state_dict_to_kohya``.
- an embedding in A1111's format (``export_ti_a1111``): a safetensors file holding one tensor ``emb_params`` (N, D),
  the safetensors form of A1111's ``.pt`` ``{"string_to_param": {"*": (N, D)}, "name": ...}``. A1111 and ComfyUI
  call the word by the file's name: ``embeddings/my-face.safetensors`` is written ``my-face`` in a prompt.

- pivotal tuning (``nbutils.combos.PivotalTuning``) as both (``export_pivotal``): its token as the embedding, its UNet
  LoRA as the kohya file, two files to put in the two tools' two folders. Not kohya's one-file ``bundle_emb.<word>.
  string_to_param.*`` convention, which A1111 reads: diffusers refuses such a file ("Invalid LoRA checkpoint. Make
  sure all LoRA param names contain 'lora' substring"), so it could not be checked by loading it back.

diffusers reads both formats too (``load_lora_checked`` and ``nbutils.textual_inversion.load_textual_inversion``
with ``token=``, or diffusers' own ``load_lora_weights`` / ``load_textual_inversion``), which is how the tests show
an export draws the same pixels as the trained pipeline.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.utils.state_dict_utils import (
    StateDictType,
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from safetensors import safe_open
from safetensors.torch import load_file, save

from nbutils import lora, textual_inversion
from nbutils.lora import check_lora_fits
from nbutils.runs import atomic_write
from nbutils.textual_inversion import A1111_KEY

COMPONENTS = ("unet", "text_encoder")  # the parts of a pipeline a study LoRA adapts


def _checked_out(out: Path) -> Path:
    """``out`` as a ``Path``; ``ValueError`` unless it ends in ``.safetensors`` (A1111 and ComfyUI pick the reader
    by the extension, and would unpickle anything else)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"Name the export {out.name!r} with the ending .safetensors, e.g. {out.stem}.safetensors: "
                         "A1111 and ComfyUI read a file by its ending.")
    return out


def _to_peft(component: str, layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One component's diffusers LoRA tensors (``unet.<layer>.lora.down.weight``, ``text_encoder.<layer>.
    lora_linear_layer.down.weight``) named as peft names them (``<component>.<layer>.lora_A.weight``), by diffusers'
    converters. Text-encoder layers get SD1.5's ``text_model.`` prefix back (recent transformers flatten CLIPTextModel
    without it; A1111, ComfyUI and diffusers' kohya reader expect it)."""
    if component == "unet":
        return convert_unet_state_dict_to_peft(layers)
    named = {re.sub(r"^text_encoder\.(?!text_model\.)", "text_encoder.text_model.", k): v for k, v in layers.items()}
    return convert_state_dict_to_peft(named, original_type=StateDictType.DIFFUSERS)


def _only_or_dynamic(values: set) -> str:
    """kohya's header value for a setting of every layer: the value if all layers share it, else ``"Dynamic"``."""
    return str(next(iter(values))) if len(values) == 1 else "Dynamic"


def export_lora_kohya(lora_file: Path, out: Path) -> Path:
    """Write the diffusers LoRA file ``lora_file`` (a LoRA run's or ``save_pivotal``'s
    ``pytorch_lora_weights.safetensors``) in kohya's format to ``out`` (``.safetensors``, atomically); returns ``out``.

    The A (r, in) and B (out, r) tensors are copied unchanged (same values and dtype). Each layer's ``.alpha`` is its
    component's ``lora_alpha`` from the file's ``lora_adapter_metadata`` (the rank r if the file has none, as diffusers
    then assumes), so the strength ``alpha / r`` is the original's. The header holds kohya's ``ss_network_module``,
    ``ss_network_dim`` (r) and ``ss_network_alpha``, and each entry of the source's header as ``source.<name>`` (renamed,
    so that diffusers, like A1111, takes rank and alpha from the tensors, not from its own ``lora_adapter_metadata``).
    """
    lora_file, out = Path(lora_file), _checked_out(out)
    state = load_file(lora_file)
    strays = [k for k in state if not k.startswith(tuple(f"{c}." for c in COMPONENTS))]
    if strays:
        raise ValueError(f"{lora_file} is not a diffusers LoRA file (tensors named unet.<layer>.lora.down.weight): it "
                         f"holds {strays[0]!r}. Pass the pytorch_lora_weights.safetensors a LoRA run wrote.")
    with safe_open(lora_file, "pt") as f:
        source_header = f.metadata() or {}
    configs = json.loads(source_header.get(LORA_ADAPTER_METADATA_KEY, "{}"))

    kohya = {}
    for component in COMPONENTS:
        layers = {k: v for k, v in state.items() if k.startswith(f"{component}.")}
        if not layers:
            continue
        alpha = configs.get(f"{component}.lora_alpha")
        # convert_state_dict_to_kohya sets alpha = r and names the text encoder lora_te1_ (SDXL's first encoder).
        for key, tensor in convert_state_dict_to_kohya(_to_peft(component, layers)).items():
            if key.endswith(".alpha"):
                tensor = torch.tensor(float(tensor if alpha is None else alpha))
            kohya[key.replace("lora_te1_", "lora_te_", 1)] = tensor

    ranks = {t.shape[0] for k, t in kohya.items() if k.endswith(".lora_down.weight")}
    alphas = {t.item() for k, t in kohya.items() if k.endswith(".alpha")}
    header = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": _only_or_dynamic(ranks),
              "ss_network_alpha": _only_or_dynamic(alphas),
              **{f"source.{k}": v for k, v in source_header.items() if k != "format"}}
    atomic_write(out, save(kohya, metadata=header))
    return out


def _study_names(pipe: StableDiffusionPipeline, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA tensors as ``pipe.lora_state_dict`` reads them (from a kohya file: diffusers' old names such as
    ``unet.<layer>.processor.to_q_lora.down.weight``) renamed as the study's files name them,
    ``<component>.<layer>.lora.down.weight`` / ``.up.``, the names ``check_lora_fits`` reads. Through peft's names,
    with the converters ``pipe.load_lora_weights`` applies; tensors of no component keep their names."""
    unet = {k: v for k, v in state.items() if k.startswith("unet.")}
    text = {k: v for k, v in state.items() if k.startswith("text_encoder.")}
    others = {k: v for k, v in state.items() if k not in unet and k not in text}
    renamed = convert_unet_state_dict_to_peft(unet)
    if text:
        text = convert_state_dict_to_diffusers(text, original_type=StateDictType.DIFFUSERS_OLD)
        text = convert_state_dict_to_peft(text, original_type=StateDictType.DIFFUSERS)
        if not hasattr(pipe.text_encoder, "text_model"):  # flattened CLIPTextModel: diffusers drops the prefix too
            text = {k.replace("text_encoder.text_model.", "text_encoder.", 1): v for k, v in text.items()}
        renamed.update(text)
    study = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in renamed.items()}
    return {**study, **others}


def load_lora_checked(pipe: StableDiffusionPipeline, path: Path, adapter_name: str | None = None) -> None:
    """``pipe.load_lora_weights`` from a LoRA ``.safetensors`` file in diffusers' or kohya's format, after
    ``nbutils.lora.check_lora_fits`` on its tensors as diffusers reads them: a ``ValueError`` naming the first layer
    that this model lacks (a key that maps to no module) or whose size differs, and ``pipe`` is then unchanged.

    Afterwards ``pipe(..., cross_attention_kwargs={"scale": s})`` applies it with strength ``s`` (default 1).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No LoRA file at {path}: pass a .safetensors file (a run's "
                                "pytorch_lora_weights.safetensors or an export_lora_kohya file).")
    state, _ = pipe.lora_state_dict(str(path.parent), weight_name=path.name)
    check_lora_fits(pipe, _study_names(pipe, state), str(path))
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)


def export_ti_a1111(embedding_file: Path, out: Path, token: str) -> Path:
    """Write the vectors of the placeholder ``token`` from the diffusers embedding file ``embedding_file``
    (``learned_embeds.safetensors``, ``{token: (N, D)}``) as an A1111 embedding to ``out`` (``.safetensors``,
    atomically): the one tensor ``emb_params`` (N, D), values and dtype unchanged, and the header entry ``name``
    (``token``). Returns ``out``.

    A1111 and ComfyUI take the word from the file name (put it in their ``embeddings/`` folder as e.g.
    ``my-face.safetensors`` and prompt ``my-face``); diffusers: ``load_textual_inversion(pipe, out, token=token)``.
    """
    embedding_file, out = Path(embedding_file), _checked_out(out)
    state = load_file(embedding_file)
    if token not in state:
        raise ValueError(f"{embedding_file} holds {sorted(state)}, not the placeholder {token!r}: pass as token the "
                         "placeholder the embedding was learned for (the file names its tensor after it).")
    vectors = state[token].contiguous()
    atomic_write(out, save({A1111_KEY: vectors}, metadata={"format": "pt", "name": token}))
    return out


def export_pivotal(folder: Path, out_dir: Path, name: str) -> dict[str, Path]:
    """Write the ``nbutils.combos.save_pivotal`` folder ``folder`` for A1111 and ComfyUI into ``out_dir`` (created if
    missing): ``<name>.safetensors``, the token's vectors as an A1111 embedding (``export_ti_a1111``), and
    ``<name>-lora.safetensors``, the UNet LoRA in kohya's format (``export_lora_kohya``). Returns
    ``{"embedding": path, "lora": path}``.

    Where they go: the embedding in A1111's ``embeddings/`` (ComfyUI's ``models/embeddings/``), the LoRA in A1111's
    ``models/Lora/`` (ComfyUI's ``models/loras/``). A1111's prompt then says ``name`` where the study's said the
    placeholder, plus ``<lora:<name>-lora:1>``; ComfyUI's says ``embedding:<name>`` and loads the LoRA with a node.
    ``name``: letters, digits, ``_`` and ``-`` only, since it becomes a word of the prompt.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"Name the export with letters, digits, _ and - only (e.g. 'my-face'), not {name!r}: A1111 "
                         "and ComfyUI make the embedding's file name a word of the prompt.")
    lora_file, embedding_file = folder / lora.WEIGHTS_NAME, folder / textual_inversion.WEIGHTS_NAME
    missing = [p.name for p in (lora_file, embedding_file) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {' and '.join(missing)}: pass the folder that "
                                "nbutils.combos.save_pivotal wrote.")
    tokens = list(load_file(embedding_file))
    if len(tokens) != 1:
        raise ValueError(f"{embedding_file} holds {tokens}, not one placeholder's vectors: pass a save_pivotal folder.")
    return {"embedding": export_ti_a1111(embedding_file, out_dir / f"{name}.safetensors", tokens[0]),
            "lora": export_lora_kohya(lora_file, out_dir / f"{name}-lora.safetensors")}
