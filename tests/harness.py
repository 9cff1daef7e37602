"""Load checkpoints through REAL vLLM on CPU and compare every expert parameter with the bytes on disk.

Test-only.  Run inside a vLLM venv, one fresh interpreter per setting (the shim is armed, or not, at
start-up by sitecustomize):

    PYTHONPATH=<checkout> python tests/harness.py CKPT [CKPT ...]    # prints one JSON line per checkpoint

Follows vLLM's own path (facts.md section 3): EngineArgs -> create_engine_config, gloo world of 1,
get_model_loader, initialize_model on CPU, loader.load_weights.  CPU needs four test-only settings:
the CPU platform, a NVFP4 MoE backend choice that tolerates CPU (no kernel runs while loading),
vLLM's emulation NVFP4 linear kernel registered for CPU, and (0.34+) Triton declared present.
``process_weights_after_loading`` repacks for GPU kernels and is not run.

Before loading, every parameter is filled with a sentinel (NaN, or 0xFF bytes) so a parameter vLLM never
wrote is visible afterwards.

``HARNESS_CALLS`` (test-only) says how the weights reach ``model.load_weights``: ``loader`` (default,
vLLM's full load), ``N`` (the loader's own weight stream cut into N consecutive calls, as weight
updates do; ``every`` for one tensor per call), optionally prefixed ``dummy+`` (vLLM's dummy loader
first, as RL frameworks start).  ``HARNESS_BREAK`` (test-only): ``fold`` makes the shim's fold raise
on the second expert, to prove the load fails open.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")

import torch

SENTINEL_BYTE = 0xFF
_EXPERT = re.compile(
    r"^model\.language_model\.layers\.(\d+)\.mlp\.experts\."
    r"(?:(gate_proj|up_proj|down_proj)\.(\d+)|(\d+)\.(gate_proj|up_proj|down_proj))\.(\w+)$"
)
_PARAM = re.compile(r"language_model\.model\.layers\.(\d+)\.mlp\.experts\.(?:routed_experts\.)?(w13|w2)_(\w+)$")
# checkpoint suffix -> vLLM parameter suffix
_SUFFIX = {
    "weight": "weight",
    "weight_packed": "weight",  # ModelOpt model: the bug report's spelling; renamed to weight
    "weight_scale": "weight_scale",
    "weight_scale_2": "weight_scale_2",
    "input_scale": "input_scale",
    "weight_global_scale": "weight_global_scale",
    "input_global_scale": "input_global_scale",
}


# -- CPU enablement (test-only) --------------------------------------------------------------------
def force_cpu_platform() -> None:
    """vLLM 0.25+ honour VLLM_TARGET_DEVICE=cpu; older ones need the platform set by hand."""
    import vllm.platforms as platforms

    current = getattr(platforms, "_current_platform", None)
    if current is not None and type(current).__name__ == "CpuPlatform":
        return
    from vllm.platforms.cpu import CpuPlatform

    platforms._current_platform = CpuPlatform()


def allow_x86_cpu_without_triton() -> None:
    """vLLM 0.34+ refuse x86 CPUs without triton-cpu at config time (``RuntimeError: vLLM on x86 CPUs
    requires Triton``); loading runs no Triton kernel.  Detected in the CPU platform's own check."""
    import inspect

    import vllm.triton_utils as triton_utils
    from vllm.platforms.cpu import CpuPlatform

    if getattr(triton_utils, "HAS_TRITON", True):
        return
    check = getattr(CpuPlatform, "check_and_update_config", None)
    with contextlib.suppress(OSError, TypeError):
        if check is not None and "requires Triton" in inspect.getsource(check):
            triton_utils.HAS_TRITON = True


def tolerate_nvfp4_on_cpu() -> None:
    """Let NVFP4 layers be *constructed* on CPU: no kernel runs during loading."""
    from vllm.platforms import PlatformEnum

    try:  # vLLM 0.24+: linear kernels are selected from a registry
        from vllm.model_executor.kernels.linear import register_linear_kernel
        from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel

        register_linear_kernel(EmulationNvFp4LinearKernel, PlatformEnum.CPU, "nvfp4")
    except ImportError:
        pass
    import importlib

    def moe_fallback() -> tuple[Any, Any]:
        from vllm.model_executor.layers.fused_moe.oracle import nvfp4 as oracle

        names = [n for n in ("EMULATION", "MARLIN") if hasattr(oracle.NvFp4MoeBackend, n)]
        backend = getattr(oracle.NvFp4MoeBackend, names[0])
        return backend, oracle.backend_to_kernel_cls(backend)[0]

    def linear_fallback() -> Any:
        from vllm.model_executor.layers.quantization.utils.nvfp4_utils import NvFp4LinearBackend

        return NvFp4LinearBackend.EMULATION

    fallbacks = {"select_nvfp4_moe_backend": moe_fallback, "select_nvfp4_linear_backend": linear_fallback}
    for modname in (
        "vllm.model_executor.layers.quantization.modelopt",
        "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe",
        "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_w4a4_nvfp4",
        "vllm.model_executor.layers.quantization.compressed_tensors.schemes.compressed_tensors_w4a4_nvfp4",
    ):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for fname, fallback in fallbacks.items():
            original = getattr(mod, fname, None)
            if original is None or getattr(original, "_cpu_fallback", False):
                continue

            def wrapper(*args: Any, _original: Any = original, _fallback: Any = fallback, **kwargs: Any) -> Any:
                try:
                    return _original(*args, **kwargs)
                except (NotImplementedError, ValueError, RuntimeError, AssertionError):
                    return _fallback()

            wrapper._cpu_fallback = True  # type: ignore[attr-defined]
            setattr(mod, fname, wrapper)


# -- building and loading ------------------------------------------------------------------------------
_dist_ready = False


def _init_distributed() -> None:
    global _dist_ready
    if _dist_ready:
        return
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed_environment(
        world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", local_rank=0, backend="gloo"
    )
    initialize_model_parallel(1, 1)
    _dist_ready = True


def build(ckpt: str, after_config: Any = None) -> tuple[Any, Any, Any]:
    """(model, loader, vllm_config) for ``ckpt``, built the way vLLM builds it, on CPU."""
    force_cpu_platform()  # before vLLM's engine modules read (and cache) the platform
    allow_x86_cpu_without_triton()
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import initialize_model

    tolerate_nvfp4_on_cpu()
    args = EngineArgs(model=ckpt, skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16", max_model_len=1024)
    vllm_config = args.create_engine_config()
    if after_config is not None:
        after_config()  # vLLM has (re)configured logging by now
    with set_current_vllm_config(vllm_config):
        _init_distributed()
        loader = get_model_loader(vllm_config.load_config)
        with torch.device("cpu"):
            model = initialize_model(vllm_config=vllm_config)
    return model, loader, vllm_config


# vLLM-owned defaults that no checkpoint here carries (FP8 KV-cache scales start at 1.0)
_NOT_FROM_CHECKPOINT = re.compile(r"\.attn\.(q|k|v|prob)_(scale|zero_point)$")


def checkpoint_params(model: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not _NOT_FROM_CHECKPOINT.search(n)}


def fill_sentinel(model: Any) -> None:
    with torch.no_grad():
        for p in checkpoint_params(model).values():
            if p.dtype.is_floating_point and p.dtype.itemsize > 1:
                p.data.fill_(float("nan"))
            else:
                p.data.view(torch.uint8).fill_(SENTINEL_BYTE)


def _unwritten(t: torch.Tensor) -> torch.Tensor:
    """Per leading index: True where the whole slice still holds the sentinel."""
    if t.dtype.is_floating_point and t.dtype.itemsize > 1:
        flat = t.detach().float().reshape(t.shape[0], -1) if t.dim() else t.detach().float().reshape(1, 1)
        return torch.isnan(flat).all(dim=1)
    raw = t.detach().contiguous().view(torch.uint8)
    flat = raw.reshape(raw.shape[0], -1) if raw.dim() else raw.reshape(1, 1)
    return (flat == SENTINEL_BYTE).all(dim=1)


def expected_experts(ckpt: Path) -> dict[tuple[int, str, str], dict[int, torch.Tensor]]:
    """(layer, 'w13'|'w2', vLLM suffix) -> expert -> expected tensor, read independently of the shim."""
    from safetensors import safe_open

    quant = json.loads((ckpt / "config.json").read_text()).get("quantization_config") or {}
    suffixes = dict(_SUFFIX)
    if quant.get("quant_method") == "compressed-tensors":
        suffixes["weight_packed"] = "weight_packed"

    raw: dict[tuple[int, int, str, str], torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():  # noqa: SIM118
                m = _EXPERT.match(name)
                if m is None or m.group(6) not in suffixes:
                    continue
                layer = int(m.group(1))
                proj = m.group(2) or m.group(5)
                expert = int(m.group(3) or m.group(4))
                raw[(layer, expert, proj, suffixes[m.group(6)])] = st.get_tensor(name)
    out: dict[tuple[int, str, str], dict[int, torch.Tensor]] = {}
    for (layer, expert, proj, suffix), t in raw.items():
        if proj == "down_proj":
            out.setdefault((layer, "w2", suffix), {})[expert] = t
        elif proj == "gate_proj":
            up = raw.get((layer, expert, "up_proj", suffix))
            if up is None:
                continue
            both = torch.stack([t.reshape(()), up.reshape(())]) if t.numel() == 1 else torch.cat([t, up], 0)
            out.setdefault((layer, "w13", suffix), {})[expert] = both
    return out


def _first(module: Any, attr: str) -> Any:
    for m in module.modules():
        value = getattr(m, attr, None)
        if value is not None and not callable(value):
            return value
    return None


def observed(model: Any) -> dict[str, Any]:
    """What the built model itself uses (not what the config says): experts, top-k renormalization, rope."""
    layer = model.language_model.model.layers[0]
    section = _first(layer.self_attn, "mrope_section")
    return {
        "num_experts": _first(layer.mlp, "global_num_experts"),
        "renormalize": _first(layer.mlp, "renormalize"),
        "rope_theta": _first(layer.self_attn, "base"),
        "mrope_section": list(section) if section is not None else None,
    }


def dequant_errors(model: Any, ckpt: Path) -> dict[str, float]:
    """Worst relative L2 error, over experts, of gate and up as vLLM will dequantize w13 (one global
    scale, its gate column) against the checkpoint's own per-projection dequantization."""
    import checkpoints

    expected = expected_experts(ckpt)
    ct = any(k[2] == "weight_global_scale" for k in expected)
    suffixes = ("weight_packed", "weight_global_scale") if ct else ("weight", "weight_scale_2")
    params = dict(model.named_parameters())
    worst = {"gate": 0.0, "up": 0.0}
    for pname, p in params.items():
        m = _PARAM.search(pname)
        if m is None or m.group(2) != "w13" or m.group(3) != suffixes[0]:
            continue
        layer, base = int(m.group(1)), pname[: -len(suffixes[0])]
        scales, glob = params[base + "weight_scale"].data, params[base + suffixes[1]].data
        for e, packed in expected[(layer, "w13", suffixes[0])].items():
            ck_scales = expected.get((layer, "w13", "weight_scale"), {}).get(e)
            ck_glob = expected.get((layer, "w13", suffixes[1]), {}).get(e)
            if ck_scales is None or ck_glob is None:
                continue  # a damaged checkpoint lacks them
            rows = packed.shape[0] // 2
            as_s2 = (lambda x: 1.0 / float(x)) if ct else float
            got = checkpoints.dequantize(p.data[e], scales[e], as_s2(glob[e, 0]))
            for i, half in enumerate(("gate", "up")):
                sl = slice(i * rows, (i + 1) * rows)
                want = checkpoints.dequantize(packed[sl], ck_scales[sl], as_s2(ck_glob[i]))
                worst[half] = max(worst[half], float((got[sl] - want).norm() / want.norm()))
    return worst


def held(model: Any) -> dict[str, torch.Tensor]:
    """The text model vLLM holds, as per-projection checkpoint tensors (canonical names) dequantized the way
    vLLM will: w13's halves with gate's global scale, q/k/v each with the max of the three (the fused
    qkv's).  tests/e2e/reference.Reference (``w13_global="own"``) runs it."""
    out: dict[str, torch.Tensor] = {}
    lm = model.language_model
    for name, p in lm.named_parameters():
        t = p.data.detach().clone()
        new = "lm_head.weight" if name == "lm_head.weight" else "model.language_model." + name.removeprefix("model.")
        m = re.search(r"^(.*\.mlp\.experts)\.(?:routed_experts\.)?(w13|w2)_(weight|weight_scale|weight_scale_2)$", new)
        if m is not None:
            base, which, suffix = m.groups()
            for e in range(t.shape[0]):
                if which == "w2":
                    out[f"{base}.{e}.down_proj.{suffix}"] = t[e]
                    continue
                half = t.shape[1] // 2 if suffix != "weight_scale_2" else None
                for i, proj in enumerate(("gate_proj", "up_proj")):
                    out[f"{base}.{e}.{proj}.{suffix}"] = t[e, 0] if half is None else t[e, i * half : (i + 1) * half]
            continue
        m = re.search(r"^(.*\.self_attn)\.qkv_proj\.(weight|weight_scale|weight_scale_2)$", new)
        if m is not None:
            base, suffix = m.groups()
            qkv = dict(lm.named_modules())[name.rsplit(".", 1)[0]]
            sizes = list(qkv.output_partition_sizes)
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                if suffix == "weight_scale_2":
                    out[f"{base}.{proj}.{suffix}"] = t.max()
                else:
                    out[f"{base}.{proj}.{suffix}"] = t[sum(sizes[:i]) : sum(sizes[: i + 1])]
            continue
        if name.endswith("input_scale") or re.search(r"\.attn\.\w+_scale$", name):
            continue
        out[new] = t.reshape(()) if name.endswith("weight_scale_2") else t
    return out


def compare(model: Any, ckpt: Path, *, scale_only_gate: bool = False) -> dict[str, Any]:
    """Every expert parameter vs the checkpoint bytes, plus every parameter left at the sentinel."""
    expected = expected_experts(ckpt)
    params = checkpoint_params(model)
    mismatched: list[str] = []
    checked = 0
    found: set[tuple[int, str, str]] = set()
    for pname, p in params.items():
        m = _PARAM.search(pname)
        if m is None:
            continue
        layer, which, suffix = int(m.group(1)), m.group(2), m.group(3)
        want = expected.get((layer, which, suffix))
        if want is None:
            continue
        found.add((layer, which, suffix))
        for expert, t in want.items():
            if expert >= p.shape[0]:
                continue  # an out-of-range expert of a damaged checkpoint has no parameter row
            got = p.data[expert]
            if got.shape != t.shape:
                t = t.reshape(got.shape)
            if got.dtype != t.dtype:
                t = t.to(got.dtype)
            checked += 1
            a = got.contiguous().view(torch.uint8) if got.dim() else got.reshape(1).view(torch.uint8)
            b = t.contiguous().view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
            if not torch.equal(a, b):
                mismatched.append(f"{pname}[{expert}]")
    missing_params = sorted(f"layer {k[0]} {k[1]}_{k[2]}" for k in expected if k not in found)
    unwritten = []
    for pname, p in params.items():
        rows = _unwritten(p.data)
        if bool(rows.any()):
            unwritten.append(f"{pname}[{','.join(str(i) for i in rows.nonzero().flatten().tolist()[:8])}]")
    mismatched = mismatched[:20] + ([f"... {len(mismatched) - 20} more"] if len(mismatched) > 20 else [])
    digest = hashlib.sha256()
    for pname in sorted(params):
        digest.update(pname.encode())
        digest.update(params[pname].data.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "checked": checked,
        "mismatched": mismatched,
        "unwritten": unwritten,
        "unmatched": missing_params,
        "digest": digest.hexdigest(),
    }


class _Records(logging.Handler):
    """The shim's log lines for one checkpoint (vLLM logs to stdout, shared by all loads)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def load(model: Any, loader: Any, vllm_config: Any, calls: str) -> None:
    """Weights into ``model`` the way ``calls`` says (see the module docstring)."""
    model_config = vllm_config.model_config
    if calls.startswith("dummy+"):
        from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

        DummyModelLoader(vllm_config.load_config).load_weights(model, model_config)
        calls = calls[len("dummy+") :]
    if calls == "loader":
        loader.load_weights(model, model_config)
        return
    weights = [(n, t.clone()) for n, t in loader.get_all_weights(model_config, model)]  # the bytes vLLM reads
    size = 1 if calls == "every" else max(1, -(-len(weights) // int(calls)))
    for start in range(0, len(weights), size):
        model.load_weights(weights=weights[start : start + size])  # RLHF examples pass a list, by keyword


def _break_fold() -> None:
    import vllm_modelopt_shim.harmonize as harmonize

    real, calls = harmonize.fold_many, []

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the second batch (layer)
            raise RuntimeError("injected by HARNESS_BREAK=fold")
        return real(*args, **kwargs)

    harmonize.fold_many = broken  # type: ignore[assignment]


def run_one(ckpt: str) -> dict[str, Any]:
    records = _Records()
    shim_logger = logging.getLogger("vllm.modelopt_shim")
    try:
        result = _run_one(ckpt, lambda: shim_logger.addHandler(records))
    finally:
        shim_logger.removeHandler(records)
    result["shim_log"] = records.lines
    return result


def _run_one(ckpt: str, attach: Any) -> dict[str, Any]:
    result: dict[str, Any] = {"ckpt": ckpt, "shim_log": []}
    try:
        model, loader, vllm_config = build(ckpt, after_config=attach)
    except Exception as exc:  # construction failure (config problems)
        result.update(
            stage="build", error=type(exc).__name__, message=str(exc)[:2000], tb=traceback.format_exc()[-3000:]
        )
        return result
    result["model"] = observed(model)
    fill_sentinel(model)
    from vllm.config import set_current_vllm_config

    try:
        with set_current_vllm_config(vllm_config):
            load(model, loader, vllm_config, os.environ.get("HARNESS_CALLS", "loader"))
        result["stage"] = "loaded"
    except Exception as exc:
        result.update(
            stage="load", error=type(exc).__name__, message=str(exc)[:2000], tb=traceback.format_exc()[-3000:]
        )
    result.update(compare(model, Path(ckpt)))
    # test-only: write what vLLM holds, for a reference forward (HARNESS_HELD_ROOT: one dir per checkpoint)
    target = os.environ.get("HARNESS_HELD") or (
        str(Path(os.environ["HARNESS_HELD_ROOT"]) / Path(ckpt).name) if os.environ.get("HARNESS_HELD_ROOT") else None
    )
    if target and result.get("stage") == "loaded":
        import shutil

        from safetensors.torch import save_file

        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(ckpt) / "config.json", Path(target) / "config.json")
        save_file({n: t.contiguous().clone() for n, t in held(model).items()}, str(Path(target) / "model.safetensors"))
    quant = json.loads((Path(ckpt) / "config.json").read_text()).get("quantization_config")
    if quant and result.get("stage") == "loaded":
        result["dequant"] = dequant_errors(model, Path(ckpt))
    try:
        import vllm_modelopt_shim.patch as patch

        result["patched"] = patch.is_applied()
        ledger = patch.last_ledger()
        if ledger is not None:  # every scale value the shim checked; how it judged the last call
            result["scales"] = {"values": dict(ledger.scalars())}
            result["full"] = ledger.full
    except Exception:
        result["patched"] = False
    return result


def main(argv: list[str]) -> int:
    if os.environ.get("HARNESS_BREAK") == "fold":
        _break_fold()
    for ckpt in argv:
        print("HARNESS " + json.dumps(run_one(ckpt)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
