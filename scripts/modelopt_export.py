"""Make a real ModelOpt 0.43.0 NVFP4 export of a tiny random Qwen3-VL-MoE, on CPU.

Usage: python3 scripts/modelopt_export.py DST [--algo nvfp4|nvfp4_awq] [--seed N] [--bf16 DST2]

Why: the shim's synthetic checkpoints (tests/checkpoints.py) must match what ModelOpt really writes,
and NVFP4_AWQ (issue 33) can only be judged on what AWQ-lite calibration really produces.  This is the
bug report's setup (ModelOpt 0.43.0 + transformers 4.57.6: the legacy ``experts.<proj>.<N>`` layout),
in a cached venv of its own (~/.cache/vllm-modelopt-shim/venvs/modelopt-0.43.0, ``.complete`` marker
as scripts/venv.py).  The bf16 original goes to DST2 (default: DST's sibling ``<name>-bf16``) so that
an exact reference can be computed (tests/awq_reference.py).  Deterministic for a seed.

CPU patches (facts.md sections 3 and 6), numerics of calibration only; the exported format is ModelOpt's:
- ``unified_export_hf.is_moe()`` -> False for the experts blocks (else: ``NotImplementedError: MoE
  model with experts type 'QuantQwen3VLMoeTextExperts' is not supported in export``);
- 0.43's fp4 capability probe -> False (it asks CUDA);
- AWQ-lite only: ``tensor_quant.dynamic_block_quantize_op`` (CUDA-only: asserts ``amax.is_cuda``) is
  replaced by a pure-torch NVFP4 quantize-dequantize built from ModelOpt's own ``NVFP4QTensor``.
Calibration is text only, so the vision tower's quantizers are disabled (``*visual*``): exported bf16
and excluded as ``model.visual*``, as in the real exports facts.md describes.  Seen in the output
(not a patch): the export's own dummy forward (token id 1) reaches top_k experts per layer; only
those get gate/up resmoothed (one ``pre_quant_scale``, ``weight_scale_2`` and ``input_scale``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import venv as venvs

VERSION = "0.43.0"
PACKAGES = [
    f"nvidia-modelopt=={VERSION}",
    "transformers==4.57.6",
    "torch==2.13.0",  # the local CPU wheel pip takes for this exact pin
    "requests",  # ModelOpt imports it without requiring it
    "safetensors",
    "accelerate",  # ModelOpt's Qwen3-VL-MoE experts plugin uses accelerate.init_empty_weights
]
# The tiny model: every dimension NVFP4 needs (K % 16), experts and KV groups enough to show per-expert
# and per-group differences.  Special token ids as tests/checkpoints.py writes them.
DIMS = {
    "hidden": 128,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "head_dim": 32,
    "experts": 8,
    "top_k": 2,
    "moe_intermediate": 64,
    "vocab": 1024,
}
TOKENS = {"image": 1001, "video": 1002, "vision_start": 1003, "vision_end": 1004, "bos": 1005, "eos": 1006}
CALIB = (8, 64)  # random token batches x length: enough that every expert of every layer gets tokens


def venv_dir() -> Path:
    return venvs.root() / f"modelopt-{VERSION}"


def ensure(quiet: bool = False) -> Path:
    """Return the ModelOpt venv's python, installing it first if its marker is missing."""
    path = venv_dir()
    marker = path / ".complete"
    if marker.exists():
        return venvs.python_of(path)
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[modelopt] creating {path} (ModelOpt {VERSION}, transformers 4.57.6, torch 2.13.0 cpu)", file=sys.stderr)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    py = str(venvs.python_of(path))
    pip = [py, "-m", "pip", "install", *(["--quiet"] if quiet else []), *PACKAGES]
    if subprocess.run(pip, env=env, stdout=sys.stderr).returncode:
        raise RuntimeError(f"pip could not install {' '.join(PACKAGES)}: see its output above")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    secs = time.monotonic() - started
    marker.write_text(f"install_seconds={secs:.0f}\nsize_gb={size / 1e9:.1f}\n")
    print(f"[modelopt] installed in {secs:.0f} s, {size / 1e9:.1f} GB", file=sys.stderr)
    return venvs.python_of(path)


# -- inside the venv -------------------------------------------------------------------------------
def _tiny_config() -> Any:
    """transformers 4.57's Qwen3VLMoeConfig at the tiny size (bf16, a 2-block vision tower)."""
    import torch
    from transformers import Qwen3VLMoeConfig

    d = DIMS
    text = {
        "hidden_size": d["hidden"],
        "intermediate_size": 2 * d["hidden"],
        "num_hidden_layers": d["layers"],
        "num_attention_heads": d["heads"],
        "num_key_value_heads": d["kv_heads"],
        "head_dim": d["head_dim"],
        "num_experts": d["experts"],
        "num_experts_per_tok": d["top_k"],
        "moe_intermediate_size": d["moe_intermediate"],
        "vocab_size": d["vocab"],
        "max_position_embeddings": 4096,
        "rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True},
        "bos_token_id": TOKENS["bos"],
        "eos_token_id": TOKENS["eos"],
    }
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": d["hidden"],
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [1],
    }
    cfg = Qwen3VLMoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=TOKENS["image"],
        video_token_id=TOKENS["video"],
        vision_start_token_id=TOKENS["vision_start"],
        vision_end_token_id=TOKENS["vision_end"],
        tie_word_embeddings=False,
    )
    cfg.dtype = cfg.text_config.dtype = cfg.vision_config.dtype = torch.bfloat16  # ModelOpt exports in it
    return cfg


def _fake_nvfp4(
    inputs: Any,
    block_size: int,
    amax: Any,
    num_bits: int,
    exponent_bits: int,
    scale_num_bits: int,
    scale_exponent_bits: int,
) -> Any:
    """CPU stand-in for ModelOpt's CUDA-only NVFP4 fake quant: its own NVFP4QTensor quantize + dequantize."""
    import torch
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    if (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) != (4, 2, 8, 4):
        raise NotImplementedError(f"CPU fake quant: NVFP4 only, got {num_bits=} {exponent_bits=}")
    if amax is None:
        amax = inputs.abs().amax()
    s2 = amax.float().amax() / (6.0 * 448.0)
    x = inputs.float()
    q, scale, s2 = NVFP4QTensor.quantize(x, block_size, weights_scaling_factor_2=s2)
    out = q.dequantize(dtype=torch.float32, scale=scale, double_scale=s2, block_sizes={-1: block_size})
    return out.reshape(inputs.shape).to(inputs.dtype)


def _patch_modelopt_for_cpu() -> None:
    """The three CPU patches (module docstring); each fails loudly if ModelOpt moved the name."""
    from modelopt.torch.export import unified_export_hf
    from modelopt.torch.quantization import tensor_quant
    from modelopt.torch.quantization.qtensor import nvfp4_tensor

    original_is_moe = unified_export_hf.is_moe

    def is_moe(module: Any) -> bool:
        if type(module).__name__.endswith("Qwen3VLMoeTextSparseMoeBlock"):
            return False  # export the per-expert Linears as they are: the legacy layout
        return bool(original_is_moe(module))

    assert hasattr(unified_export_hf, "is_moe") and hasattr(nvfp4_tensor, "fp4_compatible")
    assert hasattr(tensor_quant, "dynamic_block_quantize_op")
    unified_export_hf.is_moe = is_moe
    nvfp4_tensor.fp4_compatible = lambda: False
    tensor_quant.dynamic_block_quantize_op = _fake_nvfp4


def export(dst: Path, bf16_dst: Path, algo: str, seed: int) -> None:
    """Build, calibrate and export the tiny model (runs inside the ModelOpt venv)."""
    import modelopt
    import modelopt.torch.quantization as mtq
    import torch
    import transformers
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import Qwen3VLMoeForConditionalGeneration

    _patch_modelopt_for_cpu()
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(_tiny_config()).to(torch.bfloat16).eval()
    model.save_pretrained(bf16_dst)
    model.config.dtype = torch.bfloat16  # save_pretrained leaves the string "bfloat16"; the exporter needs a dtype
    g = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(0, 1000, (1, CALIB[1]), generator=g) for _ in range(CALIB[0])]

    def forward_loop(m: Any) -> None:
        with torch.no_grad():
            for ids in batches:
                m(input_ids=ids)

    cfg = {"nvfp4": mtq.NVFP4_DEFAULT_CFG, "nvfp4_awq": mtq.NVFP4_AWQ_LITE_CFG}[algo]
    cfg = {**cfg, "quant_cfg": {**cfg["quant_cfg"], "*visual*": {"enable": False}}}  # text-only calibration
    started = time.monotonic()
    mtq.quantize(model, cfg, forward_loop)
    calib = time.monotonic() - started
    export_hf_checkpoint(model, export_dir=dst)
    print(
        f"[modelopt] {algo} export (ModelOpt {modelopt.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}; calibration {calib:.1f} s, {CALIB[0]}x{CALIB[1]} tokens, seed {seed})"
    )
    for path in (dst, bf16_dst):
        print(f"[modelopt] wrote {path}: {_summary(path)}")


def _summary(path: Path) -> str:
    """Files, tensor count, quant_algo and how many tensors of each suffix: what the export holds."""
    import collections

    from safetensors import safe_open

    names: list[str] = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names += list(st.keys())
    suffixes = collections.Counter(n.rsplit(".", 1)[-1] for n in names)
    hf_quant = path / "hf_quant_config.json"
    algo = json.loads(hf_quant.read_text())["quantization"]["quant_algo"] if hf_quant.exists() else "none (bf16)"
    files = ", ".join(sorted(p.name for p in path.iterdir()))
    counts = ", ".join(f"{k} {v}" for k, v in sorted(suffixes.items()))
    return f"{files}; quant_algo {algo}; {len(names)} tensors ({counts})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--algo", choices=("nvfp4", "nvfp4_awq"), default="nvfp4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", type=Path, help="where the bf16 original goes (default: DST's sibling <name>-bf16)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # the venv's half
    args = parser.parse_args(argv)
    dst = args.dst.resolve()
    bf16_dst = (args.bf16 or dst.with_name(f"{dst.name}-bf16")).resolve()
    if args.inside:
        export(dst, bf16_dst, args.algo, args.seed)
        return 0
    python = ensure()
    for path in (dst, bf16_dst):
        if path.exists() and any(path.iterdir()):
            sys.exit(f"modelopt_export: {path} exists and is not empty")
    cmd = [str(python), __file__, str(dst), "--algo", args.algo, "--seed", str(args.seed), "--bf16", str(bf16_dst)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, also on a machine that has a GPU: the patches assume it
    return subprocess.run([*cmd, "--inside"], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
