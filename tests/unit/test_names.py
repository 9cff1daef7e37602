"""Renaming: the legacy ModelOpt layout maps onto vLLM's, and nothing else changes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vllm_modelopt_shim.names import (
    CANONICAL,
    COMPRESSED,
    FUSED,
    LEGACY,
    MODELOPT,
    UNQUANTIZED,
    canonical,
    family_of,
    legacy,
    parse,
)

P = "model.language_model.layers.7.mlp.experts"

projs = st.sampled_from(["gate_proj", "up_proj", "down_proj"])
suffixes = st.sampled_from(
    [
        "weight",
        "weight_scale",
        "weight_scale_2",
        "input_scale",
        "weight_packed",
        "weight_global_scale",
        "input_global_scale",
    ]
)
families = st.sampled_from([MODELOPT, COMPRESSED, UNQUANTIZED, None])
layers = st.integers(0, 95)
experts = st.integers(0, 511)
# names that are not per-expert tensors: attention, norms, router, vision, fused experts
other_names = st.one_of(
    st.from_regex(
        r"\Amodel\.language_model\.layers\.\d{1,2}\.self_attn\.[qkvo]_proj\.(weight|weight_scale|input_scale)\Z"
    ),
    st.from_regex(r"\Amodel\.visual\.blocks\.\d\.(attn\.qkv|mlp\.linear_fc1)\.(weight|bias)\Z"),
    st.from_regex(r"\Amodel\.language_model\.layers\.\d{1,2}\.mlp\.(gate\.weight|experts\.(gate_up_proj|down_proj))\Z"),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz._0123456789", max_size=80),
)


def test_the_bug_report_names_become_vllm_names() -> None:
    assert canonical(f"{P}.gate_proj.0.weight_scale_2") == f"{P}.0.gate_proj.weight_scale_2"
    assert canonical(f"{P}.down_proj.127.input_scale") == f"{P}.127.down_proj.input_scale"
    assert canonical(f"{P}.up_proj.3.weight") == f"{P}.3.up_proj.weight"


def test_modelopt_packed_spelling_becomes_weight_only_in_a_modelopt_model() -> None:
    assert canonical(f"{P}.gate_proj.0.weight_packed", MODELOPT) == f"{P}.0.gate_proj.weight"
    assert canonical(f"{P}.gate_proj.0.weight_packed", COMPRESSED) == f"{P}.0.gate_proj.weight_packed"
    attn = "model.language_model.layers.0.self_attn.q_proj.weight_packed"
    assert canonical(attn, MODELOPT) == "model.language_model.layers.0.self_attn.q_proj.weight"
    assert canonical(attn, COMPRESSED) == attn


def test_compressed_tensors_suffixes_keep_their_meaning() -> None:
    for suffix in ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"):
        assert canonical(f"{P}.up_proj.1.{suffix}", COMPRESSED) == f"{P}.1.up_proj.{suffix}"


def test_fused_bf16_experts_pass_untouched() -> None:
    for name in (f"{P}.gate_up_proj", f"{P}.down_proj", f"{P}.gate_up_proj_weight_scale", f"{P}.down_proj.weight"):
        assert canonical(name) == name
        parsed = parse(name)
        assert parsed is not None and parsed.layout == FUSED


def test_parse_reports_layout_expert_projection_suffix() -> None:
    legacy_name = parse(f"{P}.down_proj.12.weight_scale")
    assert legacy_name is not None
    assert (legacy_name.prefix, legacy_name.expert, legacy_name.proj, legacy_name.suffix, legacy_name.layout) == (
        P,
        12,
        "down_proj",
        "weight_scale",
        LEGACY,
    )
    canonical_name = parse(f"{P}.12.down_proj.weight_scale")
    assert canonical_name is not None and canonical_name.layout == CANONICAL and canonical_name.expert == 12
    assert parse("model.language_model.layers.0.mlp.gate.weight") is None
    assert parse(f"{P}.0.gate_proj.base_layer.weight") is None  # LoRA wrappers are not ours


def test_family_of_quant_methods() -> None:
    assert family_of("modelopt_fp4") == MODELOPT
    assert family_of("modelopt") == MODELOPT
    assert family_of("compressed-tensors") == COMPRESSED
    assert family_of(None) == UNQUANTIZED
    assert family_of("fp8") is None


@given(layers, experts, projs, suffixes, families)
def test_renaming_is_idempotent(layer: int, expert: int, proj: str, suffix: str, family: str | None) -> None:
    name = f"model.language_model.layers.{layer}.mlp.experts.{proj}.{expert}.{suffix}"
    once = canonical(name, family)
    assert canonical(once, family) == once


@given(layers, experts, projs, suffixes)
def test_the_two_layouts_map_onto_each_other(layer: int, expert: int, proj: str, suffix: str) -> None:
    new = f"model.language_model.layers.{layer}.mlp.experts.{expert}.{proj}.{suffix}"
    old = f"model.language_model.layers.{layer}.mlp.experts.{proj}.{expert}.{suffix}"
    assert canonical(old, COMPRESSED) == new
    assert legacy(new) == old
    assert canonical(legacy(new), COMPRESSED) == new


@given(other_names, families)
def test_every_other_name_is_untouched(name: str, family: str | None) -> None:
    if name.endswith(".weight_packed"):
        return
    parsed = parse(name)
    if parsed is not None and parsed.layout != FUSED:
        return  # the random text happened to spell a per-expert name
    assert canonical(name, family) == name


def _reference_parse(name: str) -> tuple[str, int, str, str, str] | None:
    """The parse without its table of tails: what every name must come out as."""
    from vllm_modelopt_shim.names import _parse

    p = _parse(name)
    return None if p is None else (p.prefix, p.expert, p.proj, p.suffix, p.layout)


@given(layers, experts, projs, suffixes, st.booleans())
def test_the_table_of_tails_parses_like_the_full_parse(
    layer: int, expert: int, proj: str, suffix: str, old: bool
) -> None:
    name = f"model.language_model.layers.{layer}.mlp.experts." + (f"{proj}.{expert}" if old else f"{expert}.{proj}")
    name += f".{suffix}"
    for _ in range(2):  # the first time fills the table, the second reads it
        p = parse(name)
        assert p is not None and (p.prefix, p.expert, p.proj, p.suffix, p.layout) == _reference_parse(name)


@given(other_names)
def test_the_table_of_tails_leaves_other_names_to_the_full_parse(name: str) -> None:
    for _ in range(2):
        p = parse(name)
        assert (None if p is None else (p.prefix, p.expert, p.proj, p.suffix, p.layout)) == _reference_parse(name)


def test_a_tail_seen_in_one_layer_is_parsed_for_the_next_layer_with_its_own_prefix() -> None:
    """Breaking the table (say, caching the whole parse by tail) must fail: every layer keeps its prefix."""
    a, b = parse(f"{P}.gate_proj.3.weight"), parse(f"{P.replace('.7.', '.8.')}.gate_proj.3.weight")
    assert a is not None and b is not None
    assert (a.prefix, b.prefix) == (P, P.replace(".7.", ".8."))
    assert (b.expert, b.proj, b.layout) == (3, "gate_proj", LEGACY)
    odd = "x.experts.a.experts.3.gate_proj.weight"  # the first ".experts." is not the layer's
    c = parse(odd)
    assert c is not None and (c.prefix, c.expert, c.proj, c.suffix, c.layout) == _reference_parse(odd)
    assert parse(".experts.gate_proj.3.weight") is None  # no prefix at all
