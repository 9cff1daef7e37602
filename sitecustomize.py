"""vllm-modelopt-shim's doorbell: arms the shim in every Python process of a vLLM deployment.

It runs the sitecustomize it shadows, reads VLLM_MODELOPT_SHIM*, and registers a stdlib-only
import hook; nothing heavy is imported until vLLM loads its Qwen3-VL-MoE model module.
Nothing else lives here.
"""

try:
    from vllm_modelopt_shim._bootstrap import boot
except Exception as _exc:  # never break an interpreter's start-up
    import sys

    sys.stderr.write(f"vllm-modelopt-shim: not armed ({type(_exc).__name__}: {_exc}); vLLM runs stock\n")
else:
    boot(__file__)
