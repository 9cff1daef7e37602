"""Tiny Qwen3-VL-MoE checkpoints written the way the real exporters write them (facts.md section 2).

Test-only (imports torch and safetensors).  Weights are random bf16, then really NVFP4-quantized:
``weight`` uint8 [N, K/2] (two e2m1 codes per byte, even column in the low nibble, bit 3 = sign),
``weight_scale`` float8_e4m3fn [N, K/16], ``weight_scale_2`` float32 0-D = amax / (6 * 448), and
``input_scale`` float32 0-D = activation amax / (6 * 448).  compressed-tensors spells the same bytes
``weight_packed`` / ``weight_scale`` and stores the reciprocal global scales with shape [1].

    write(path, layout="legacy", family="modelopt")    # the bug report's checkpoint
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP8_MAX = 448.0
PROJS = ("gate_proj", "up_proj", "down_proj")

# Small, but every dimension is a multiple of what NVFP4 needs (K % 16, packed pairs).
TINY = {
    "hidden": 256,
    "moe_intermediate": 128,
    "experts": 4,
    "top_k": 2,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "head_dim": 32,
    "vocab": 1024,
    "v_hidden": 64,
    "v_intermediate": 128,
    "v_depth": 2,
    "v_heads": 2,
    "v_positions": 64,
    "deepstack": [1],
}
TOKENS = {"image": 1001, "video": 1002, "vision_start": 1003, "vision_end": 1004, "bos": 1005, "eos": 1006}

Tensors = dict[str, torch.Tensor]


# -- NVFP4 ---------------------------------------------------------------------------------------
def quantize(w: torch.Tensor, s2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real NVFP4 quantization of a [N, K] weight: (packed uint8, fp8 block scales, fp32 0-D global).

    ``s2`` imposes a shared global scale (ModelOpt unifies q/k/v before export).
    """
    w = w.float()
    n, k = w.shape
    if s2 is None:
        s2 = w.abs().max() / (6.0 * FP8_MAX)
    blocks = w.view(n, k // 16, 16)
    scale = (blocks.abs().amax(-1) / 6.0 / s2).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    eff = (scale.float() * s2).clamp(min=1e-30)[..., None]
    x = (blocks / eff).view(n, k)
    grid = torch.tensor(E2M1)
    mag = (x.abs()[..., None] - grid).abs().argmin(-1).to(torch.uint8)
    codes = mag | ((x < 0) & (mag > 0)).to(torch.uint8) << 3
    packed = codes[:, 0::2] | codes[:, 1::2] << 4
    return packed.contiguous(), scale.contiguous(), s2.reshape(()).to(torch.float32)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, s2: float) -> torch.Tensor:
    """The checkpoint's own dequantization: e2m1 value * block scale * global scale."""
    lut = torch.tensor([*E2M1, *(-v for v in E2M1)])
    codes = torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2).long()
    values = lut[codes]
    n, k = values.shape
    return (values.view(n, k // 16, 16) * scale.float()[..., None] * s2).view(n, k)


# -- config files ---------------------------------------------------------------------------------
def config(family: str, generation: str = "4.57", dims: dict[str, object] | None = None) -> dict[str, object]:
    """config.json as transformers `generation` writes it, with the exporter's quantization_config."""
    d = {**TINY, **(dims or {})}
    rope = {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True}
    text: dict[str, object] = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": TOKENS["bos"],
        "decoder_sparse_step": 1,
        "dtype": "bfloat16",
        "eos_token_id": TOKENS["eos"],
        "head_dim": d["head_dim"],
        "hidden_act": "silu",
        "hidden_size": d["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": 2 * int(d["hidden"]),  # type: ignore[call-overload]
        "max_position_embeddings": 4096,
        "mlp_only_layers": [],
        "model_type": "qwen3_vl_moe_text",
        "moe_intermediate_size": d["moe_intermediate"],
        "num_attention_heads": d["heads"],
        "num_experts_per_tok": d["top_k"],
        "num_hidden_layers": d["layers"],
        "num_key_value_heads": d["kv_heads"],
        "rms_norm_eps": 1e-06,
        "use_cache": True,
        "vocab_size": d["vocab"],
    }
    vision: dict[str, object] = {
        "deepstack_visual_indexes": d["deepstack"],
        "depth": d["v_depth"],
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": d["v_hidden"],
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": d["v_intermediate"],
        "model_type": "qwen3_vl_moe",
        "num_heads": d["v_heads"],
        "num_position_embeddings": d["v_positions"],
        "out_hidden_size": d["hidden"],
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if generation == "4.57":
        text.update(num_experts=d["experts"], norm_topk_prob=True, rope_scaling=rope, rope_theta=5000000)
        version = "4.57.6"
    elif generation == "5":
        # transformers 5: num_local_experts, rope_parameters, no norm_topk_prob (its router always renormalizes)
        text.update(
            num_local_experts=d["experts"],
            rope_parameters={**rope, "rope_theta": 5000000},
            router_aux_loss_coef=0.001,
            pad_token_id=None,
            sliding_window=None,
            tie_word_embeddings=False,
        )
        vision["model_type"] = "qwen3_vl_moe_vision"
        version = "5.14.0"
    else:
        raise ValueError(generation)
    cfg: dict[str, object] = {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"],
        "image_token_id": TOKENS["image"],
        "model_type": "qwen3_vl_moe",
        "text_config": text,
        "tie_word_embeddings": False,
        "transformers_version": version,
        "video_token_id": TOKENS["video"],
        "vision_config": vision,
        "vision_end_token_id": TOKENS["vision_end"],
        "vision_start_token_id": TOKENS["vision_start"],
    }
    excluded = ["lm_head", "model.language_model.embed_tokens"]
    excluded += [f"model.language_model.layers.{i}.mlp.gate" for i in range(int(d["layers"]))]  # type: ignore[call-overload]
    excluded += ["model.visual*"]
    if family == "modelopt":
        group = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
        cfg["quantization_config"] = {
            "config_groups": {"group_0": {"input_activations": group, "weights": group, "targets": ["Linear"]}},
            "ignore": excluded,
            "quant_algo": "NVFP4",
            "producer": {"name": "modelopt", "version": "0.43.0"},
            "quant_method": "modelopt",
        }
    elif family == "compressed-tensors":
        args = {
            "actorder": None,
            "block_structure": None,
            "group_size": 16,
            "num_bits": 4,
            "observer_kwargs": {},
            "strategy": "tensor_group",
            "symmetric": True,
            "type": "float",
        }
        cfg["quantization_config"] = {
            "config_groups": {
                "group_0": {
                    "format": "nvfp4-pack-quantized",
                    "input_activations": {**args, "dynamic": "local", "observer": "static_minmax"},
                    "output_activations": None,
                    "targets": ["Linear"],
                    "weights": {**args, "dynamic": False, "observer": "static_minmax"},
                }
            },
            "format": "nvfp4-pack-quantized",
            "global_compression_ratio": None,
            "ignore": ["lm_head", "re:.*mlp.gate$", "re:visual.*", "re:model.visual.*"],
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "version": "0.12.2",
        }
    return cfg


def hf_quant_config(cfg: dict[str, object]) -> dict[str, object]:
    q = cfg["quantization_config"]
    assert isinstance(q, dict)
    quantization = {"quant_algo": q["quant_algo"], "kv_cache_quant_algo": None, "group_size": 16}
    if q["quant_algo"] == "NVFP4_AWQ":  # as ModelOpt 0.43 writes it
        quantization.update(has_zero_point=False, pre_quant_scale=True)
    return {"producer": q["producer"], "quantization": {**quantization, "exclude_modules": q["ignore"]}}


@dataclass(frozen=True, slots=True)
class Awq:
    """A synthetic NVFP4_AWQ export: each expert's gate/up/down and each o_proj get a ``pre_quant_scale``
    p (bf16) and are quantized as ``W / p``, so ``(x * p) @ dequant(W_q).T`` is the model.

    ``outlier``: p of 1/32 of the input channels, shared by all experts of a layer, is divided by it
    (AWQ shrinks the channels whose activations are outliers): p max/min >= ``outlier``.
    ``spread``: each tensor's own log-normal variation on top.  ``gate_up_equal``: up's p is gate's."""

    outlier: float = 1.0
    spread: float = 0.15
    gate_up_equal: bool = False

    def p(self, g: torch.Generator, n: int, shared: torch.Tensor | None) -> torch.Tensor:
        own = torch.exp(torch.randn(n, generator=g) * self.spread)
        return (own if shared is None else own * shared).to(torch.bfloat16)

    def shared(self, g: torch.Generator, n: int) -> torch.Tensor:
        base = torch.ones(n)
        base[torch.randperm(n, generator=g)[: max(1, n // 32)]] = 1.0 / self.outlier
        return base


# -- tensors --------------------------------------------------------------------------------------
def _bf16(g: torch.Generator, *shape: int, std: float = 0.05) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)


def _linear(
    out: Tensors,
    name: str,
    w: torch.Tensor,
    family: str,
    input_scale: float,
    s2: torch.Tensor | None = None,
    p: torch.Tensor | None = None,
) -> None:
    if family == "bf16":
        out[f"{name}.weight"] = w.to(torch.bfloat16)
        return
    if p is not None:  # AWQ: the exported weight is W / p, p rides along
        w = w.float() / p.float()[None, :]
        out[f"{name}.pre_quant_scale"] = p.clone()
    packed, scale, own_s2 = quantize(w, s2)
    if family == "modelopt":
        out[f"{name}.weight"] = packed
        out[f"{name}.weight_scale"] = scale
        out[f"{name}.weight_scale_2"] = own_s2.clone()
        out[f"{name}.input_scale"] = torch.tensor(input_scale, dtype=torch.float32)
    else:
        out[f"{name}.weight_packed"] = packed
        out[f"{name}.weight_scale"] = scale
        out[f"{name}.weight_global_scale"] = (1.0 / own_s2).reshape(1)
        out[f"{name}.input_global_scale"] = torch.tensor([1.0 / input_scale], dtype=torch.float32)


def tensors(
    family: str = "modelopt",
    layout: str = "legacy",
    *,
    seed: int = 0,
    up_mismatch: float = 1.0,
    dims: dict[str, object] | None = None,
    awq: Awq | None = None,
) -> Tensors:
    """Every tensor of the tiny model, named as the exporter names them.

    ``family``: modelopt | compressed-tensors | bf16.  ``layout``: legacy | canonical | fused (bf16 only).
    ``up_mismatch`` scales up_proj of odd experts, so its global scale differs from gate's by that
    factor (ModelOpt's per-expert export does not unify them; seen up to 1.14).
    """
    d = {**TINY, **(dims or {})}
    g = torch.Generator().manual_seed(seed)
    h, i, e = int(d["hidden"]), int(d["moe_intermediate"]), int(d["experts"])  # type: ignore[call-overload]
    hd, nh, kv = int(d["head_dim"]), int(d["heads"]), int(d["kv_heads"])  # type: ignore[call-overload]
    vh, vi = int(d["v_hidden"]), int(d["v_intermediate"])  # type: ignore[call-overload]
    merged = vh * 4
    out: Tensors = {}
    vis = "model.visual"
    out[f"{vis}.patch_embed.proj.weight"] = _bf16(g, vh, 3, 2, 16, 16)
    out[f"{vis}.patch_embed.proj.bias"] = _bf16(g, vh)
    out[f"{vis}.pos_embed.weight"] = _bf16(g, int(d["v_positions"]), vh)  # type: ignore[call-overload]
    for b in range(int(d["v_depth"])):  # type: ignore[call-overload]
        p = f"{vis}.blocks.{b}"
        for norm in ("norm1", "norm2"):
            out[f"{p}.{norm}.weight"] = (1 + _bf16(g, vh)).to(torch.bfloat16)
            out[f"{p}.{norm}.bias"] = _bf16(g, vh)
        for name, shape in (
            ("attn.qkv", (3 * vh, vh)),
            ("attn.proj", (vh, vh)),
            ("mlp.linear_fc1", (vi, vh)),
            ("mlp.linear_fc2", (vh, vi)),
        ):
            out[f"{p}.{name}.weight"] = _bf16(g, *shape)
            out[f"{p}.{name}.bias"] = _bf16(g, shape[0])
    mergers = ["merger"] + [f"deepstack_merger_list.{j}" for j in range(len(d["deepstack"]))]  # type: ignore[arg-type]
    for m in mergers:
        width = vh if m == "merger" else merged
        out[f"{vis}.{m}.norm.weight"] = (1 + _bf16(g, width)).to(torch.bfloat16)
        out[f"{vis}.{m}.norm.bias"] = _bf16(g, width)
        out[f"{vis}.{m}.linear_fc1.weight"] = _bf16(g, merged, merged)
        out[f"{vis}.{m}.linear_fc1.bias"] = _bf16(g, merged)
        out[f"{vis}.{m}.linear_fc2.weight"] = _bf16(g, h, merged)
        out[f"{vis}.{m}.linear_fc2.bias"] = _bf16(g, h)

    lm = "model.language_model"
    out[f"{lm}.embed_tokens.weight"] = _bf16(g, int(d["vocab"]), h, std=0.5)  # type: ignore[call-overload]
    out[f"{lm}.norm.weight"] = (1 + _bf16(g, h)).to(torch.bfloat16)
    out["lm_head.weight"] = _bf16(g, int(d["vocab"]), h)  # type: ignore[call-overload]
    for layer in range(int(d["layers"])):  # type: ignore[call-overload]
        p = f"{lm}.layers.{layer}"
        out[f"{p}.input_layernorm.weight"] = (1 + _bf16(g, h)).to(torch.bfloat16)
        out[f"{p}.post_attention_layernorm.weight"] = (1 + _bf16(g, h)).to(torch.bfloat16)
        out[f"{p}.self_attn.q_norm.weight"] = (1 + _bf16(g, hd)).to(torch.bfloat16)
        out[f"{p}.self_attn.k_norm.weight"] = (1 + _bf16(g, hd)).to(torch.bfloat16)
        q, k, v = _bf16(g, nh * hd, h), _bf16(g, kv * hd, h), _bf16(g, kv * hd, h)
        qkv_s2 = torch.stack([t.float().abs().max() for t in (q, k, v)]).max() / (6 * FP8_MAX)
        a_scale = 4.0 / (6 * FP8_MAX)
        for name, w in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            _linear(out, f"{p}.self_attn.{name}", w, family, a_scale, qkv_s2 if family != "bf16" else None)
        o_p = awq.p(g, nh * hd, None) if awq is not None else None
        _linear(out, f"{p}.self_attn.o_proj", _bf16(g, h, nh * hd), family, 2.0 / (6 * FP8_MAX), p=o_p)
        out[f"{p}.mlp.gate.weight"] = _bf16(g, e, h, std=0.2)
        experts = f"{p}.mlp.experts"
        if layout == "fused":
            assert family == "bf16", "fused experts are the bf16 HF layout"
            out[f"{experts}.gate_up_proj"] = _bf16(g, e, h, 2 * i)
            out[f"{experts}.down_proj"] = _bf16(g, e, i, h)
            continue
        shared = awq.shared(g, h) if awq is not None else None
        for x in range(e):
            in_scale = (3.0 + x) / (6 * FP8_MAX)
            gate, up, down = _bf16(g, i, h), _bf16(g, i, h), _bf16(g, h, i)
            if x % 2 == 1:
                up = (up.float() * up_mismatch).to(torch.bfloat16)
            ps: dict[str, torch.Tensor | None] = dict.fromkeys(PROJS)
            if awq is not None:
                ps["gate_proj"] = awq.p(g, h, shared)
                ps["up_proj"] = ps["gate_proj"] if awq.gate_up_equal else awq.p(g, h, shared)
                ps["down_proj"] = awq.p(g, i, None)
            for proj, w, a in (
                ("gate_proj", gate, in_scale),
                ("up_proj", up, in_scale),
                ("down_proj", down, 2 * in_scale),
            ):
                name = f"{experts}.{proj}.{x}" if layout == "legacy" else f"{experts}.{x}.{proj}"
                _linear(out, name, w, family, a, p=ps[proj])
    return out


# -- writing --------------------------------------------------------------------------------------
_GATE_UP = re.compile(r"\.experts\.(?:gate_proj|up_proj)\.|\.experts\.\d+\.(?:gate_proj|up_proj)\.")


def write(
    path: Path,
    family: str = "modelopt",
    layout: str = "legacy",
    *,
    generation: str = "4.57",
    split: str | None = None,
    packed_name: str | None = None,
    edit: Callable[[Tensors], None] | None = None,
    seed: int = 0,
    up_mismatch: float = 1.0,
    dims: dict[str, object] | None = None,
    config_edit: Callable[[dict[str, object]], None] | None = None,
    awq: Awq | None = None,
) -> Path:
    """Write a checkpoint directory; returns it.

    ``split="gate-up-first"`` puts every gate/up expert tensor in the first of two shards, so stock
    vLLM sees them before any down_proj tensor (the silent-garbage order).  ``packed_name`` renames
    the ModelOpt packed weight (the bug report spells it ``weight_packed``).  ``edit`` damages the
    tensor dict before writing.
    """
    path.mkdir(parents=True, exist_ok=True)
    ts = tensors(family, layout, seed=seed, up_mismatch=up_mismatch, dims=dims, awq=awq)
    if packed_name is not None:
        ts = {
            (n[: -len("weight")] + packed_name if n.endswith(".weight") and _is_nvfp4(ts, n) else n): t
            for n, t in ts.items()
        }
    if edit is not None:
        edit(ts)
    cfg = config(family, generation, dims)
    if awq is not None:  # ModelOpt 0.43's NVFP4_AWQ config.json: no config_groups
        q = cfg["quantization_config"]
        assert isinstance(q, dict)
        q["quant_algo"] = "NVFP4_AWQ"
        q.pop("config_groups", None)
    if config_edit is not None:
        config_edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if family == "modelopt":
        (path / "hf_quant_config.json").write_text(json.dumps(hf_quant_config(cfg), indent=4))
    meta = {"format": "pt"}
    if split is None:
        save_file(ts, str(path / "model.safetensors"), metadata=meta)
        return path
    assert split == "gate-up-first"
    first = {n: t for n, t in ts.items() if _GATE_UP.search(n)}
    second = {n: t for n, t in ts.items() if n not in first}
    files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    weight_map: dict[str, str] = {}
    for fname, part in files.items():
        save_file(part, str(path / fname), metadata=meta)
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in ts.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def read(path: Path) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint directory in vLLM's order (shards sorted, each in its file order)."""
    from safetensors import safe_open

    out = []
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out += [(n, f.get_tensor(n)) for n in f.keys()]  # noqa: SIM118 - vLLM's order
    return out


def as_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes (any dtype, any shape, 0-D too)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _is_nvfp4(ts: Tensors, weight_name: str) -> bool:
    return weight_name[: -len("weight")] + "weight_scale" in ts
