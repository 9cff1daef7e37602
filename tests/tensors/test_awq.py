"""The NVFP4_AWQ folds' arithmetic (fp8.rescale_rows, awq.py) and the stream holding pieces in any order."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import checkpoints  # noqa: E402
import numpy as np  # noqa: E402

from vllm_modelopt_shim import awq, fp8  # noqa: E402
from vllm_modelopt_shim.__main__ import main  # noqa: E402
from vllm_modelopt_shim.awq import Shapes  # noqa: E402
from vllm_modelopt_shim.awqfold import AwqFolder  # noqa: E402
from vllm_modelopt_shim.doctor import CANNOT, NEEDS_SHIM, STOCK, diagnose  # noqa: E402
from vllm_modelopt_shim.harmonize import Folder, rescale_rows  # noqa: E402
from vllm_modelopt_shim.ledger import Ledger  # noqa: E402
from vllm_modelopt_shim.names import MODELOPT, canonical  # noqa: E402
from vllm_modelopt_shim.stream import rewrite  # noqa: E402


def test_rescale_rows_rounds_every_code_as_encode_does() -> None:
    """Every fp8 code (NaN, negatives, subnormals) times factors from 1e-3 to 1e4: the bit arithmetic
    equals the exact product rounded by fp8.encode (ties to even, saturating at 448)."""
    rng = np.random.default_rng(0)
    factors = np.concatenate([rng.uniform(1e-3, 8.0, 300), 2.0 ** np.arange(-9, 10), [1.0, 1.0625, 448 / 0.001953125]])
    codes = np.tile(np.arange(256, dtype=np.uint8), (len(factors), 1))
    exact = fp8.values()[codes].astype(np.float32) * factors.astype(np.float32)[:, None]
    assert np.array_equal(fp8.rescale_rows(codes, factors), fp8.encode(exact.astype(np.float64)))


def test_the_runtimes_torch_rounding_equals_fp8_rescale_rows() -> None:
    """harmonize.rescale_rows (torch's fp8 cast, chunked) gives fp8.rescale_rows's bytes for every code,
    over more rows than one chunk."""
    rng = np.random.default_rng(1)
    factors = np.concatenate([rng.uniform(1e-3, 8.0, 3000), 2.0 ** np.arange(-9, 10), [448 / 0.001953125]])
    codes = np.tile(np.arange(256, dtype=np.uint8), (len(factors), 1))
    ours, theirs = fp8.rescale_rows(codes, factors), rescale_rows(codes, factors)
    nan = (codes & 0x7F) == 0x7F
    assert np.array_equal(ours[~nan], theirs[~nan])
    assert np.all((theirs[nan] & 0x7F) == 0x7F)  # NaN stays NaN


def test_bf16_rounding_is_torchs() -> None:
    x = torch.randn(4096) * torch.logspace(-20, 20, 4096)
    x[::97] = float("nan")
    bits = awq.to_bits(x.numpy(), "bfloat16")
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(x.numpy())
    assert np.array_equal(bits[finite], want[finite])
    assert np.isnan(awq.from_bits(bits, "bfloat16")[~finite]).all()
    assert np.array_equal(awq.from_bits(want, "bfloat16"), x.to(torch.bfloat16).float().numpy(), equal_nan=True)


def test_up_takes_downs_p_within_fp8_rounding_and_gate_stays() -> None:
    """fold_many with rows: up's effective weight (gate's global scale, as vLLM reads w13) is within fp8
    rounding of the exact row-scaled weight; gate keeps its bytes unless the shift moves it."""
    g = torch.Generator().manual_seed(0)
    gate_w, up_w = torch.randn(64, 256, generator=g) * 0.05, torch.randn(64, 256, generator=g) * 0.07
    (gp, gs, g2), (up, us, u2) = checkpoints.quantize(gate_w), checkpoints.quantize(up_w)
    p = torch.exp(torch.randn(64, generator=g) * 0.5)
    codes = (gs.view(torch.uint8).numpy(), us.view(torch.uint8).numpy())
    [f] = fp8.fold_many([(*codes, float(g2), float(u2))], reciprocal=False, rows=[p.numpy()])
    assert f is not None
    new_up = checkpoints.dequantize(up, torch.from_numpy(f.up).view(torch.float8_e4m3fn), f.common)
    want = checkpoints.dequantize(up, us, float(u2)) * p[:, None]
    err = float((new_up - want).norm() / want.norm())
    assert err <= 0.03 and abs(err - f.after) <= 0.01, (err, f.after)
    new_gate = checkpoints.dequantize(gp, torch.from_numpy(f.gate).view(torch.float8_e4m3fn), f.common)
    assert torch.allclose(new_gate, checkpoints.dequantize(gp, gs, float(g2)), rtol=0, atol=0) or f.shift > 0


def test_attention_fold_moves_the_group_mean_into_v_and_a_power_of_two_into_o() -> None:
    rng = np.random.default_rng(2)
    heads, kv, hd = 4, 2, 32
    p = np.exp(rng.normal(0, 0.3, heads * hd)).astype(np.float32)
    v = fp8.encode(rng.uniform(10, 448, (kv * hd, 8)))
    v[0, 0] = fp8.encode(np.array([448.0]))[0]  # the top block: any factor > 1 there needs the shift
    fold = awq.AttentionFold.of(p, v, heads, kv)
    mean = p.reshape(kv, heads // kv, hd).mean(1).reshape(-1)
    got = fp8.values()[fold.v_codes] * 2.0**fold.shift
    want = fp8.values()[v] * mean[:, None]
    assert fold.shift >= 1 and fp8.values()[fold.v_codes].max() <= 448
    assert np.abs(got / want - 1).max() <= 2**-4  # one fp8 rounding
    left = np.abs(p.reshape(kv, heads // kv, hd) / mean.reshape(kv, 1, hd) - 1).max()
    assert fold.left == pytest.approx(left, rel=1e-6) and fold.left > 0


# -- the stream: any order, one result ---------------------------------------------------------------
E, H, INTER, HEADS, KV, HD = 4, 64, 32, 2, 1, 32


def _awq_tensors(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """One decoder layer of an NVFP4_AWQ export (legacy names): experts, router, norm, o/v projections."""
    g = torch.Generator().manual_seed(seed)
    lm = "model.language_model.layers.0"
    out: list[tuple[str, torch.Tensor]] = []

    def linear(name: str, rows: int, cols: int, p: bool) -> None:
        packed, scale, s2 = checkpoints.quantize(torch.randn(rows, cols, generator=g) * 0.05)
        out.extend([(f"{name}.weight", packed), (f"{name}.weight_scale", scale), (f"{name}.weight_scale_2", s2)])
        out.append((f"{name}.input_scale", torch.tensor(0.01)))
        if p:
            out.append((f"{name}.pre_quant_scale", torch.exp(torch.randn(cols, generator=g) * 0.3).to(torch.bfloat16)))

    for e in range(E):
        linear(f"{lm}.mlp.experts.gate_proj.{e}", INTER, H, True)
        linear(f"{lm}.mlp.experts.up_proj.{e}", INTER, H, True)
        linear(f"{lm}.mlp.experts.down_proj.{e}", H, INTER, True)
    linear(f"{lm}.self_attn.o_proj", H, HEADS * HD, True)
    linear(f"{lm}.self_attn.v_proj", KV * HD, H, False)
    out.append((f"{lm}.mlp.gate.weight", (torch.randn(E, H, generator=g) * 0.2).to(torch.bfloat16)))
    out.append((f"{lm}.post_attention_layernorm.weight", (1 + torch.randn(H, generator=g) * 0.1).to(torch.bfloat16)))
    return out


def _load(order: list[tuple[str, torch.Tensor]]) -> tuple[dict[str, bytes], Ledger, AwqFolder, Folder]:
    ledger = Ledger(MODELOPT, E, full=True)
    ledger.awq = True
    folder = Folder(reciprocal=False, num_experts=E, rows=True)
    awqf = AwqFolder(Shapes(H, INTER, HEADS, KV, HD), E)
    out = {}
    for name, t in rewrite(order, ledger, scalar=torch.Tensor.item, fold=folder, final=True, awq=awqf):
        assert name not in out, f"{name} forwarded twice"
        out[name] = t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
    return out, ledger, awqf, folder


def test_any_order_gives_the_same_bytes_and_no_p_reaches_vllm() -> None:
    tensors = _awq_tensors()
    first, _, awqf, folder = _load(tensors)
    assert not [n for n in first if n.endswith("pre_quant_scale")]
    assert len(first) == len(tensors) - (3 * E + 1)  # every tensor but the p's, each once
    assert awqf.tally.exact + awqf.tally.residual + folder.result.rows == 3 * E + 1
    assert folder.result.rows == E and awqf.error is None and folder.error is None
    before = {canonical(n): t for n, t in tensors}
    for changed in (
        "post_attention_layernorm.weight",
        "mlp.gate.weight",
        "v_proj.weight_scale",
        "0.up_proj.weight_scale",
    ):
        name = next(n for n in first if n.endswith(changed))
        assert first[name] != before[name].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes(), name
    for seed in range(3):
        shuffled = list(tensors)
        random.Random(seed).shuffle(shuffled)
        assert _load(shuffled)[0] == first
    assert _load(list(reversed(tensors)))[0] == first


def test_norm_and_router_carry_the_layer_mean_exactly() -> None:
    """norm * p_bar and router / p_bar: the router's logits on the folded norm's output are unchanged
    up to bf16 rounding, and the experts see x * p_bar."""
    tensors = dict(_awq_tensors())
    out, *_ = _load(list(tensors.items()))
    lm = "model.language_model.layers.0"
    ps = [
        tensors[f"{lm}.mlp.experts.{proj}.{e}.pre_quant_scale"].float()
        for proj in ("gate_proj", "up_proj")
        for e in range(E)
    ]
    mean = torch.stack(ps).double().mean(0).float()
    norm = torch.frombuffer(bytearray(out[f"{lm}.post_attention_layernorm.weight"]), dtype=torch.bfloat16)
    want = (tensors[f"{lm}.post_attention_layernorm.weight"].float() * mean).to(torch.bfloat16)
    assert torch.equal(norm, want)
    router = torch.frombuffer(bytearray(out[f"{lm}.mlp.gate.weight"]), dtype=torch.bfloat16).view(E, H)
    x = torch.randn(16, H)
    logits = (x * tensors[f"{lm}.post_attention_layernorm.weight"].float()) @ tensors[
        f"{lm}.mlp.gate.weight"
    ].float().t()
    folded = (x * norm.float()) @ router.float().t()
    assert float((folded - logits).norm() / logits.norm()) <= 0.01


# -- doctor and convert -------------------------------------------------------------------------------
@pytest.mark.parametrize(("layout", "split"), [("legacy", None), ("canonical", None), ("legacy", "gate-up-first")])
def test_convert_writes_plain_nvfp4_equal_to_what_the_runtime_hands_vllm(
    tmp_path: Path, layout: str, split: str | None
) -> None:
    src = checkpoints.write(tmp_path / "src", layout=layout, split=split, awq=checkpoints.Awq(outlier=10.0))
    d = diagnose(src)
    assert d.verdict == NEEDS_SHIM and d.awq is not None and d.as_dict()["awq"]["folded"] == 2 * (4 * 3 + 1)
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 0
    dims = checkpoints.TINY
    ledger = Ledger(MODELOPT, 4, full=True)
    ledger.awq = True
    shapes = Shapes(dims["hidden"], dims["moe_intermediate"], dims["heads"], dims["kv_heads"], dims["head_dim"])  # type: ignore[arg-type]
    awqf = AwqFolder(shapes, 4)
    folder = Folder(reciprocal=False, num_experts=4, rows=True)
    stream = rewrite(checkpoints.read(src), ledger, scalar=torch.Tensor.item, fold=folder, final=True, awq=awqf)
    runtime = {n: checkpoints.as_bytes(t) for n, t in stream}
    written = {n: checkpoints.as_bytes(t) for n, t in checkpoints.read(tmp_path / "dst")}
    assert written == runtime and not [n for n in written if "pre_quant_scale" in n]
    for name in ("config.json", "hf_quant_config.json"):
        text = (tmp_path / "dst" / name).read_text()
        assert '"NVFP4"' in text and "NVFP4_AWQ" not in text and "pre_quant_scale" not in text, name
    if split:
        index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(written)
    again = diagnose(tmp_path / "dst")
    assert again.verdict == STOCK and again.awq is None, again.as_dict()


@pytest.mark.parametrize(
    ("edit", "error", "tensor"),
    [
        ("zero", "UnusableScaleError", "model.language_model.layers.1.mlp.experts.up_proj.2.pre_quant_scale"),
        ("short", "UnusableScaleError", "model.language_model.layers.0.self_attn.o_proj.pre_quant_scale"),
        ("no-norm", "MissingTensorError", "model.language_model.layers.1.post_attention_layernorm.weight"),
        ("no-p", "MissingTensorError", "model.language_model.layers.0.mlp.experts.gate_proj.3.pre_quant_scale"),
    ],
)
def test_the_doctor_refuses_damaged_awq_naming_the_tensor(tmp_path: Path, edit: str, error: str, tensor: str) -> None:
    def damage(ts: dict[str, torch.Tensor]) -> None:
        if edit == "zero":
            ts[tensor] = torch.zeros_like(ts[tensor])
        elif edit == "short":
            ts[tensor] = ts[tensor][:-16].clone()
        else:
            del ts[tensor]

    src = checkpoints.write(tmp_path / "src", awq=checkpoints.Awq(outlier=10.0), edit=damage)
    d = diagnose(src)
    assert d.verdict == CANNOT and [type(p).__name__ for p in d.problems] == [error], d.problems
    assert d.problems[0].name == tensor
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 1 and not (tmp_path / "dst").exists()


def test_the_doctor_predicts_the_runtimes_residual(tmp_path: Path) -> None:
    src = checkpoints.write(tmp_path / "src", awq=checkpoints.Awq(outlier=10.0, spread=0.2))
    d = diagnose(src)
    dims = checkpoints.TINY
    awqf = AwqFolder(
        Shapes(dims["hidden"], dims["moe_intermediate"], dims["heads"], dims["kv_heads"], dims["head_dim"]), 4
    )  # type: ignore[arg-type]
    ledger = Ledger(MODELOPT, 4, full=True)
    ledger.awq = True
    folder = Folder(reciprocal=False, num_experts=4, rows=True)
    for _ in rewrite(checkpoints.read(src), ledger, scalar=torch.Tensor.item, fold=folder, final=True, awq=awqf):
        pass
    assert d.awq is not None and d.awq.worst == awqf.tally.worst > 0.1 and d.awq.where == awqf.tally.where
    assert d.awq.exact == awqf.tally.exact + folder.result.rows and d.awq.residual == awqf.tally.residual
