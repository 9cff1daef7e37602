"""Exact-AWQ reference logits for a ModelOpt NVFP4_AWQ export, and the fold-only prototype (issue 33).

Test helper, not a test (imports torch).  Why: serving an NVFP4_AWQ checkpoint can only be judged
against what the checkpoint means, ``y = (x * p) @ dequant(W).T`` for every Linear with a
``pre_quant_scale`` p (facts.md section 6); vLLM applies no p at all.  The forward is
tests/e2e/reference.py's (float32, unquantized activations, weights dequantized with
tests/checkpoints.dequantize, each tensor's own global scale); p is applied by scaling the dequantized
weight's input columns, ``(x * p) @ W.T == x @ (W * p).T``.  Also reads the bf16 original that
scripts/modelopt_export.py saves (transformers 4.57's fused ``experts.gate_up_proj`` [E, H, 2I] and
``experts.down_proj`` [E, I, H]), so that "exact AWQ vs bf16" and "plain NVFP4 vs bf16" can be measured.

    python3 tests/awq_reference.py AWQ_DIR [--nvfp4 DIR] [--bf16 DIR]   # prints the rel-L2 table
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints
from e2e.reference import Reference

Tensors = dict[str, torch.Tensor]
P = ".pre_quant_scale"
#: an expert tensor's base name in either spelling: experts.<proj>.<N> (legacy) or experts.<N>.<proj>
_EXPERT = re.compile(
    r"^(?P<layer>.*\.layers\.\d+)\.mlp\.experts\."
    r"(?:(?P<p1>gate_proj|up_proj|down_proj)\.(?P<e1>\d+)|(?P<e2>\d+)\.(?P<p2>gate_proj|up_proj|down_proj))$"
)


def tokens(batches: int = 4, length: int = 64, seed: int = 0, vocab: int = 1000) -> list[list[int]]:
    """Fixed random token sequences (below the special ids of tests/checkpoints.TOKENS)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batches, length), generator=g).tolist()  # type: ignore[no-any-return]


def reference(ckpt: Path, *, ignore_p: bool = False) -> Reference:
    """tests/e2e/reference.Reference of ``ckpt`` with AWQ's p applied (or ignored), fused bf16 experts split."""
    ref = Reference(ckpt, w13_global="own")
    w = ref.w
    for name in [n for n in w if n.endswith(P)]:
        p = w.pop(name)
        if not ignore_p:
            weight = name[: -len(P)] + ".weight"
            w[weight] = w[weight] * p[None, :]  # p scales the input columns: (x * p) @ W.T
    for name in [n for n in w if n.endswith(".experts.gate_up_proj")]:
        base = name[: -len("gate_up_proj")]
        gate_up, down = w.pop(name), w.pop(f"{base}down_proj")
        half = gate_up.shape[-1] // 2
        for e in range(gate_up.shape[0]):
            w[f"{base}{e}.gate_proj.weight"] = gate_up[e, :, :half].t().contiguous()
            w[f"{base}{e}.up_proj.weight"] = gate_up[e, :, half:].t().contiguous()
            w[f"{base}{e}.down_proj.weight"] = down[e].t().contiguous()
    return ref


def logits(ckpt: Path, ids: Sequence[Sequence[int]], *, ignore_p: bool = False) -> torch.Tensor:
    """[batches, length, vocab] float32 logits of the exact AWQ model (or with p ignored) at ``ckpt``."""
    ref = reference(ckpt, ignore_p=ignore_p)
    return torch.stack([ref.logits(list(seq)) for seq in ids])


def logits_of(tensors: Tensors, like: Path, ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Logits of a tensor dict (e.g. ``fold_only``'s result) with ``like``'s config.json."""
    with tempfile.TemporaryDirectory(prefix="awq-reference-") as tmp:
        shutil.copy(like / "config.json", Path(tmp) / "config.json")
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(Path(tmp) / "model.safetensors"))
        return logits(Path(tmp), ids)


def load(ckpt: Path) -> Tensors:
    out: Tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over all positions and vocabulary entries."""
    return float((a - b).double().norm() / b.double().norm())


# -- the fold-only prototype ---------------------------------------------------------------------------
STEPS = ("down", "gate_up", "o")


def _shift(products: torch.Tensor) -> int:
    """The smallest k >= 0 that keeps every folded block scale within fp8 after dividing by 2**k:
    harmonization's rule (the global scale grows by a power of two, other block scales shift exactly)."""
    top = float(products.max())
    k = 0
    while top / 2.0**k > checkpoints.FP8_MAX:
        k += 1
    return k


def _fold(out: Tensors, base: str, *, rows: torch.Tensor | None = None, blocks: torch.Tensor | None = None) -> int:
    """Multiply ``base``'s fp8 block scales by ``rows`` [N] and/or ``blocks`` [K/16], re-round to fp8;
    the tensor's own global scale absorbs a power of two if needed (returned)."""
    scale = out[f"{base}.weight_scale"].float()
    if rows is not None:
        scale = scale * rows.float()[:, None]
    if blocks is not None:
        scale = scale * blocks.float()[None, :]
    k = _shift(scale)
    out[f"{base}.weight_scale"] = (scale * 0.5**k).clamp(max=checkpoints.FP8_MAX).to(torch.float8_e4m3fn)
    out[f"{base}.weight_scale_2"] = out[f"{base}.weight_scale_2"] * 2.0**k
    return k


def _block_mean(residual: torch.Tensor) -> torch.Tensor:
    return residual.float().view(-1, 16).mean(-1)


def _experts(tensors: Tensors) -> dict[str, dict[tuple[str, int], str]]:
    """layer prefix -> (proj, expert) -> the expert Linear's base name."""
    out: dict[str, dict[tuple[str, int], str]] = {}
    for name in tensors:
        if not name.endswith(".weight_scale"):
            continue
        m = _EXPERT.match(name[: -len(".weight_scale")])
        if m:
            proj, e = m["p1"] or m["p2"], int(m["e1"] or m["e2"])
            out.setdefault(m["layer"], {})[(proj, e)] = m[0]
    return out


def fold_only(
    tensors: Tensors, *, steps: Sequence[str] = STEPS, residual: str = "drop", common_global: bool = False
) -> Tensors:
    """Issue 33's fold-only transform of an NVFP4_AWQ export: p folded, no e2m1 payload touched.

    ``down``: down_proj's p into up_proj's fp8 block-scale rows (up's output row r times p_down[r] is
    down's input times p_down): exact but for fp8 rounding.
    ``gate_up``: the layer mean of its experts' gate/up p into ``post_attention_layernorm.weight``,
    the router's columns divided by it (bf16): exact; each expert's p_e / mean is the residual.
    ``o``: o_proj's p, averaged over the query heads of each KV group, into v_proj's output rows
    through v's block scales; q, k, v keep one global scale.  The heads' p / mean is the residual.
    ``residual``: ``drop`` (left unapplied) or ``block`` (its mean over each 16-column block folded
    into that projection's block scales, exact per block).  Steps not named keep their p in the dict.
    ``common_global``: then give up_proj gate_proj's global scale (harmonization's rule, as vLLM's
    w13 reads gate's for both halves).
    """
    out = dict(tensors)
    for layer, experts in _experts(tensors).items():
        count = 1 + max(e for _, e in experts)
        names = [experts[(proj, e)] for e in range(count) for proj in ("gate_proj", "up_proj")]
        if "gate_up" in steps and all(f"{n}{P}" in out for n in names):
            ps = {n: out.pop(f"{n}{P}").float() for n in names}
            mean = torch.stack(list(ps.values())).mean(0)
            norm, router = f"{layer}.post_attention_layernorm.weight", f"{layer}.mlp.gate.weight"
            out[norm] = (out[norm].float() * mean).to(out[norm].dtype)
            out[router] = (out[router].float() / mean[None, :]).to(out[router].dtype)
            if residual == "block":
                for n, p in ps.items():
                    _fold(out, n, blocks=_block_mean(p / mean))
        for e in range(count):
            gate, up, down = (experts[(proj, e)] for proj in checkpoints.PROJS)
            rows = out.pop(f"{down}{P}", None) if "down" in steps else None
            if common_global:
                _common_global(out, gate, up, rows)
            elif rows is not None:
                _fold(out, up, rows=rows)
    heads, kv, head_dim = _heads(tensors)
    for o_p in [n for n in out if n.endswith(f".self_attn.o_proj{P}")] if "o" in steps else []:
        attn = o_p[: -len(f".o_proj{P}")]
        p = out.pop(o_p).float().view(kv, heads // kv, head_dim)
        group = p.mean(1, keepdim=True)
        k = _fold(out, f"{attn}.v_proj", rows=group.reshape(-1))  # v's row g*head_dim+d: dim d of group g's heads
        for x in ("q_proj", "k_proj") if k else ():  # q, k, v keep one global scale (vLLM's fused qkv)
            _fold(out, f"{attn}.{x}", rows=torch.full((out[f"{attn}.{x}.weight"].shape[0],), 0.5**k))
        if residual == "block":
            _fold(out, f"{attn}.o_proj", blocks=_block_mean((p / group).reshape(-1)))
    return out


def _common_global(out: Tensors, gate: str, up: str, rows: torch.Tensor | None) -> None:
    """Fold ``rows`` into up's block scales and give up gate's global scale times 2**k, in one rounding
    (k the smallest keeping up's block scales within fp8; gate's are divided by 2**k, exact)."""
    g2, u2 = out[f"{gate}.weight_scale_2"], float(out[f"{up}.weight_scale_2"])
    ratio = torch.full((out[f"{up}.weight"].shape[0],), u2 / float(g2))
    ratio = ratio if rows is None else ratio * rows.float()
    k = _shift(out[f"{up}.weight_scale"].float() * ratio[:, None])
    common = g2 * 2.0**k
    if k:
        _fold(out, gate, rows=torch.full_like(ratio, 0.5**k))
    _fold(out, up, rows=ratio * 0.5**k)
    out[f"{gate}.weight_scale_2"], out[f"{up}.weight_scale_2"] = common.clone(), common.clone()


def _heads(tensors: Tensors) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) from the tensors' shapes and the q/k norms."""
    q = next(n for n in tensors if n.endswith(".self_attn.q_proj.weight_scale"))
    attn = q[: -len(".q_proj.weight_scale")]
    head_dim = tensors[f"{attn}.q_norm.weight"].numel()
    return (
        tensors[q].shape[0] // head_dim,
        tensors[f"{attn}.k_proj.weight_scale"].shape[0] // head_dim,
        head_dim,
    )


# -- the measurement ------------------------------------------------------------------------------------
def measure(awq: Path, nvfp4: Path | None = None, bf16: Path | None = None, seed: int = 0) -> dict[str, float]:
    """Logits rel-L2 on ``tokens(seed=seed)``: each serving of the AWQ export vs exact AWQ, and vs bf16."""
    ids = tokens(seed=seed)
    exact = logits(awq, ids)
    ts = load(awq)
    served = {
        "ignore_p": logits(awq, ids, ignore_p=True),
        "fold_only": logits_of(fold_only(ts), awq, ids),
        "fold_only_block_residual": logits_of(fold_only(ts, residual="block"), awq, ids),
        "fold_only_common_global": logits_of(fold_only(ts, common_global=True), awq, ids),
        **{f"fold_only_{step}_alone": logits_of(fold_only(ts, steps=(step,)), awq, ids) for step in STEPS},
    }
    out = {f"{name}_vs_exact": rel_l2(x, exact) for name, x in served.items()}
    if bf16 is not None:
        original = logits(bf16, ids)
        out["exact_vs_bf16"] = rel_l2(exact, original)
        out.update({f"{name}_vs_bf16": rel_l2(x, original) for name, x in served.items()})
        if nvfp4 is not None:
            out["plain_nvfp4_vs_bf16"] = rel_l2(logits(nvfp4, ids), original)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("awq", type=Path)
    parser.add_argument("--nvfp4", type=Path, help="the plain NVFP4 export of the same bf16 model")
    parser.add_argument("--bf16", type=Path, help="the bf16 original (scripts/modelopt_export.py's <name>-bf16)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.awq, args.nvfp4, args.bf16, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- expert FFN outputs -------------------------------------------------------------------------------
def _silu_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ down.t()


def _requantized(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Dequantize, multiply input columns by p, NVFP4 again (each tensor its own global scale)."""
    packed, scale, s2 = checkpoints.quantize(w * p[None, :])
    return checkpoints.dequantize(packed, scale, float(s2))


def ffn_errors(ckpt: Path, held: Path, *, count: int = 256, seed: int = 0) -> dict[str, float]:
    """Relative L2 error, over every expert of every MoE layer on ``count`` random normalized inputs, of
    each way of serving an NVFP4_AWQ checkpoint against its exact model ``(x * p) @ dequant(W).T``:
    ``served`` (what vLLM holds after the shim's load, dumped by tests/harness.py's HARNESS_HELD: its norm
    carries the layer's p mean, its experts the residual), ``ignore`` (p dropped), ``requant`` (every
    expert weight dequantized, times p, NVFP4 again)."""
    exact_ref, held_ref = Reference(ckpt, w13_global="own"), Reference(held, w13_global="own")
    w, v = exact_ref.w, held_ref.w
    g = torch.Generator().manual_seed(seed)
    sums = {"served": 0.0, "ignore": 0.0, "requant": 0.0, "norm": 0.0}
    worst = {"served": 0.0, "ignore": 0.0, "requant": 0.0}
    layers = sorted({n.split(".mlp.experts.")[0] for n in w if ".mlp.experts." in n})
    for layer in layers:
        h0 = torch.randn(count, w[f"{layer}.post_attention_layernorm.weight"].numel(), generator=g)
        h0 = h0 * torch.rsqrt(h0.pow(2).mean(-1, keepdim=True))
        x = h0 * w[f"{layer}.post_attention_layernorm.weight"]
        xs = h0 * v[f"{layer}.post_attention_layernorm.weight"]
        experts = sorted(
            {int(n.split(".mlp.experts.")[1].split(".")[0]) for n in w if n.startswith(f"{layer}.mlp.experts.")}
        )
        for e in experts:
            base = f"{layer}.mlp.experts.{e}"
            gw, uw, dw = (w[f"{base}.{p}.weight"] for p in checkpoints.PROJS)
            pg, pu, pd = (w[f"{base}.{p}{P}"] for p in checkpoints.PROJS)
            exact = (torch.nn.functional.silu((x * pg) @ gw.t()) * ((x * pu) @ uw.t()) * pd) @ dw.t()
            ways = {
                "served": _silu_mlp(xs, *(v[f"{base}.{p}.weight"] for p in checkpoints.PROJS)),
                "ignore": _silu_mlp(x, gw, uw, dw),
                "requant": _silu_mlp(x, _requantized(gw, pg), _requantized(uw, pu), _requantized(dw, pd)),
            }
            sums["norm"] += float(exact.double().pow(2).sum())
            for way, y in ways.items():
                sq = float((y - exact).double().pow(2).sum())
                sums[way] += sq
                worst[way] = max(worst[way], (sq / float(exact.double().pow(2).sum())) ** 0.5)
    out = {way: (sums[way] / sums["norm"]) ** 0.5 for way in worst}
    out.update({f"worst_{way}": value for way, value in worst.items()})
    return out
