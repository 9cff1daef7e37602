"""TEST ONLY: let stock vLLM run NVFP4 checkpoints on CPU, by emulation (vllm-modelopt-shim e2e tests).

A ``vllm.general_plugins`` entry point; does nothing unless vLLM's current platform is the CPU.
- NVFP4 linears: registers vLLM's own ``EmulationNvFp4LinearKernel`` for ``PlatformEnum.CPU`` through
  the public ``register_linear_kernel`` (dequantize -> bf16 matmul, NVFP4 QDQ of the activations).
- NVFP4 MoE (ModelOpt and compressed-tensors, both pick their backend in ``fused_moe/oracle/nvfp4.py``):
  the EMULATION backend's experts class is Triton-only; on CPU the oracle gets a subclass whose
  ``apply`` is plain torch.  Everything before ``apply`` is vLLM's own EMULATION path, so the weights
  are interpreted exactly as vLLM's kernels interpret them: one w13 global scale
  (``w13_weight_scale_2[:, 0]`` for gate and up), ``w2_weight_scale_2`` per expert, activations
  NVFP4-quantize-dequantized with the global scales ``1 / max(w13_input_scale)`` and
  ``1 / max(w2_input_scale)``.
- ``E2E_READ_LOG=DIR``: every tensor name vLLM's safetensors iterators read from disk (``get_tensor``)
  is appended to ``DIR/reads-<pid>.txt`` (the EP weight filter test counts them per rank).
"""

from __future__ import annotations

import os
import sys

_done = False


def register() -> None:
    global _done
    try:
        from vllm.platforms import current_platform

        if _done or not current_platform.is_cpu():
            return
        _register_linear()
        _register_moe()
        if os.environ.get("E2E_READ_LOG"):
            _count_reads(os.environ["E2E_READ_LOG"])
        _done = True
    except Exception as exc:  # a plugin that raises breaks vLLM's start-up: say so, run stock
        sys.stderr.write(f"nvfp4_cpu_plugin: not registered ({type(exc).__name__}: {exc})\n")


def _count_reads(directory: str) -> None:
    """Record each tensor read through ``weight_utils.safe_open`` (a module global, looked up per file)."""
    from vllm.model_executor.model_loader import weight_utils

    real = weight_utils.safe_open
    log = os.path.join(directory, f"reads-{os.getpid()}.txt")

    class CountingSafeOpen:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self._file = real(*args, **kwargs)

        def __enter__(self) -> CountingSafeOpen:
            self._file.__enter__()
            return self

        def __exit__(self, *exc: object) -> object:
            return self._file.__exit__(*exc)

        def get_tensor(self, name: str) -> object:
            with open(log, "a") as out:
                out.write(name + "\n")
            return self._file.get_tensor(name)

        def __getattr__(self, name: str) -> object:
            return getattr(self._file, name)

    weight_utils.safe_open = CountingSafeOpen


def _register_linear() -> None:
    from vllm.model_executor.kernels.linear import register_linear_kernel
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.platforms import PlatformEnum

    register_linear_kernel(EmulationNvFp4LinearKernel, PlatformEnum.CPU, "nvfp4")


def _register_moe() -> None:
    import torch
    import torch.nn.functional as F
    from vllm.model_executor.layers.fused_moe.experts.nvfp4_emulation_moe import (
        Nvfp4QuantizationEmulationTritonExperts,
    )
    from vllm.model_executor.layers.fused_moe.oracle import nvfp4 as oracle
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import (
        dequantize_to_dtype,
        ref_nvfp4_quant_dequant,
    )

    class CpuTorchNvfp4Experts(Nvfp4QuantizationEmulationTritonExperts):
        """vLLM's NVFP4 emulation experts with a plain-torch ``apply`` (dequantize, bf16 matmuls)."""

        @staticmethod
        def _supports_current_device() -> bool:
            return True

        def apply(  # type: ignore[override]
            self,
            output: torch.Tensor,
            hidden_states: torch.Tensor,
            w1: torch.Tensor,
            w2: torch.Tensor,
            topk_weights: torch.Tensor,
            topk_ids: torch.Tensor,
            activation: object,
            global_num_experts: int,
            expert_map: torch.Tensor | None,
            *args: object,
            **kwargs: object,
        ) -> None:
            apply_on_input = bool(args[-1]) if args else bool(kwargs.get("apply_router_weight_on_input"))
            assert "silu" in str(activation).lower(), f"CPU NVFP4 MoE emulation: only SiLU, got {activation}"
            qc = self.quant_config
            dtype = hidden_states.dtype
            x = ref_nvfp4_quant_dequant(hidden_states, qc.a1_gscale, 16)
            acc = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
            for e in topk_ids.unique().tolist():
                local = e if expert_map is None else int(expert_map[e])
                if local < 0:
                    continue
                tok, slot = (topk_ids == e).nonzero(as_tuple=True)
                weight = topk_weights[tok, slot].float()[:, None]
                xe = x[tok] * weight.to(dtype) if apply_on_input else x[tok]
                w13 = dequantize_to_dtype(w1[local], self.w1_scale_val[local], qc.g1_alphas[local], dtype, 16, False)
                h = xe @ w13.t()
                half = h.shape[-1] // 2
                a = F.silu(h[:, :half]) * h[:, half:]
                a = ref_nvfp4_quant_dequant(a, qc.a2_gscale, 16)
                w2e = dequantize_to_dtype(w2[local], self.w2_scale_val[local], qc.g2_alphas[local], dtype, 16, False)
                y = (a @ w2e.t()).float()
                acc.index_add_(0, tok, y if apply_on_input else y * weight)
            output.copy_(acc.to(output.dtype))

    original = oracle.backend_to_kernel_cls

    def backend_to_kernel_cls(backend):  # type: ignore[no-untyped-def]
        if backend == oracle.NvFp4MoeBackend.EMULATION:
            return [CpuTorchNvfp4Experts]
        return original(backend)

    oracle.backend_to_kernel_cls = backend_to_kernel_cls
