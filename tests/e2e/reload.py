"""Generate, ``reload_weights`` in place (the path RL weight sync takes), generate again; print both.

Test-only; runs inside the e2e CPU venv (tests/e2e/env.py):

    python tests/e2e/reload.py CKPT       # -> one line: RELOAD {"before": [...], "after": [...], "log": ...}

vLLM's in-place reload processes each layer for its kernels inside ``model.load_weights`` as soon as
the layer's tensors are in, so whatever the shim does to the tensors must happen as they pass.
"""

from __future__ import annotations

import json
import sys
from typing import Any

PROMPTS = ["The quick brown fox", "Hello, how are you today? Tell me a story about the sea"]


def main(ckpt: str) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=ckpt, max_model_len=512, enforce_eager=True, max_num_seqs=2, seed=0)
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=5, ignore_eos=True)

    def generate() -> list[dict[str, Any]]:
        out = []
        for request in llm.generate(PROMPTS, params, use_tqdm=False):
            c = request.outputs[0]
            top = [{str(k): v.logprob for k, v in step.items()} for step in (c.logprobs or [])]
            out.append({"token_ids": list(c.token_ids), "top": top})
        return out

    before = generate()
    llm.collective_rpc("reload_weights")
    after = generate()
    print("RELOAD " + json.dumps({"before": before, "after": after}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
