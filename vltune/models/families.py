"""Model families: what differs between VLMs, in one registry.

Everything else (loading, tuners, masks, collation) is family-agnostic: it goes
through the Auto classes, the processor and the chat template. A family entry
records only what cannot be read off the checkpoint: the click-coordinate
convention, and which image-only processor to fall back on without torchvision.
Parameters are assigned to parts (vision / aligner / llm / other) by name, which
works for every family in transformers (and for PEFT-wrapped names).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    coords: str  # "rel1000": 0-1000 relative to the image; "abs_resized": pixels of the processor-resized image
    description: str


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.name] = family
    return family


register_family(ModelFamily("qwen3_vl", ("qwen3_vl", "qwen3_vl_moe"), "rel1000", "Qwen3-VL (Instruct/Thinking, dense and MoE)"))
register_family(ModelFamily("qwen2_5_vl", ("qwen2_5_vl",), "abs_resized", "Qwen2.5-VL"))
register_family(ModelFamily("qwen2_vl", ("qwen2_vl",), "rel1000", "Qwen2-VL"))
register_family(ModelFamily("idefics3", ("idefics3", "smolvlm"), "rel1000", "Idefics3 / SmolVLM"))
GENERIC = ModelFamily("generic", (), "rel1000", "any other image-text-to-text model of transformers")


def family_for_model_type(model_type: str | None) -> ModelFamily:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    return GENERIC


# ---------------------------------------------------------------- parts of a VLM
# Checked in this order: the aligner lives inside the vision module in Qwen-VL ("visual.merger").
_PART_KEYS = (
    ("aligner", ("merger", "multi_modal_projector", "connector", "mm_projector", "vision_projection",
                 "visual_projection", "aligner")),
    ("vision", ("visual", "vision_tower", "vision_model", "vision_encoder", "image_encoder", "vision_embed")),
    ("llm", ("language_model", "text_model", "lm_head", "embed_tokens", "model.layers", "model.norm")),
)
PARTS = ("vision", "aligner", "llm", "other")


def part_of(name: str) -> str:
    """'vision' | 'aligner' | 'llm' | 'other' for a parameter or module name."""
    for part, keys in _PART_KEYS:
        if any(k in name for k in keys):
            return part
    return "other"
