"""Pure-torch reference forward of the tiny Qwen3-VL-MoE's text model from a ModelOpt NVFP4 checkpoint.

Weights are dequantized with tests/checkpoints.dequantize (e2m1 * fp8 block scale * global scale) and
the forward runs in float32 with unquantized activations: what an exact NVFP4 *weight* model computes.
For text-only prompts Qwen3-VL's interleaved M-RoPE has equal t/h/w positions, which is plain RoPE.

``w13_global="gate"`` interprets up_proj with gate_proj's global scale, as vLLM's NVFP4 MoE does
(``w13_weight_scale_2[:, 0]`` for both halves); ``"own"`` uses each tensor's own (the checkpoint's
meaning).  Accepts both expert spellings (``experts.<proj>.<N>`` and ``experts.<N>.<proj>``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoints

_LEGACY = re.compile(r"\.experts\.(gate_proj|up_proj|down_proj)\.(\d+)\.")


class Reference:
    def __init__(self, ckpt: Path, w13_global: str = "gate") -> None:
        cfg = json.loads((ckpt / "config.json").read_text())["text_config"]
        self.cfg = cfg
        raw = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            raw.update(load_file(str(f)))
        raw = {_LEGACY.sub(lambda m: f".experts.{m[2]}.{m[1]}.", n): t for n, t in raw.items()}
        self.w: dict[str, torch.Tensor] = {}
        for name, t in raw.items():
            if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
                continue
            base = name[: -len(".weight")] if name.endswith(".weight") else None
            if base is not None and f"{base}.weight_scale" in raw:
                s2_name = f"{base}.weight_scale_2"
                if w13_global == "gate" and ".up_proj" in base:
                    s2_name = s2_name.replace(".up_proj", ".gate_proj")
                self.w[name] = checkpoints.dequantize(t, raw[f"{base}.weight_scale"], float(raw[s2_name]))
            else:
                self.w[name] = t.float()

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        eps = self.cfg["rms_norm_eps"]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * self.w[name]

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        hd = x.shape[-1]
        theta = self.cfg.get("rope_theta") or self.cfg["rope_parameters"]["rope_theta"]
        inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = (pos.double()[:, None] * inv[None, :]).float()
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None, :], torch.cat([ang.sin()] * 2, -1)[:, None, :]
        rot = torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * cos + rot * sin

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab] float32 logits of a causal forward over ``ids``."""
        c, w = self.cfg, self.w
        nh, kv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        top_k, n_exp = c["num_experts_per_tok"], c.get("num_experts") or c["num_local_experts"]
        lm = "model.language_model"
        t = len(ids)
        pos = torch.arange(t)
        x = w[f"{lm}.embed_tokens.weight"][torch.tensor(ids)]
        mask = torch.full((t, t), float("-inf")).triu(1)
        for layer in range(c["num_hidden_layers"]):
            p = f"{lm}.layers.{layer}"
            h = self._norm(x, f"{p}.input_layernorm.weight")
            q = (h @ w[f"{p}.self_attn.q_proj.weight"].t()).view(t, nh, hd)
            k = (h @ w[f"{p}.self_attn.k_proj.weight"].t()).view(t, kv, hd)
            v = (h @ w[f"{p}.self_attn.v_proj.weight"].t()).view(t, kv, hd)
            q = self._rope(self._norm(q, f"{p}.self_attn.q_norm.weight"), pos)
            k = self._rope(self._norm(k, f"{p}.self_attn.k_norm.weight"), pos)
            k, v = k.repeat_interleave(nh // kv, 1), v.repeat_interleave(nh // kv, 1)
            att = torch.einsum("qhd,khd->hqk", q, k) / hd**0.5 + mask
            o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(t, nh * hd)
            x = x + o @ w[f"{p}.self_attn.o_proj.weight"].t()
            h = self._norm(x, f"{p}.post_attention_layernorm.weight")
            probs = (h @ w[f"{p}.mlp.gate.weight"].t()).softmax(-1)
            weights, chosen = probs.topk(top_k, -1)
            if c.get("norm_topk_prob", True):
                weights = weights / weights.sum(-1, keepdim=True)
            out = torch.zeros_like(h)
            for e in range(n_exp):
                tok, slot = (chosen == e).nonzero(as_tuple=True)
                if tok.numel() == 0:
                    continue
                ex = f"{p}.mlp.experts.{e}"
                he = h[tok]
                a = F.silu(he @ w[f"{ex}.gate_proj.weight"].t()) * (he @ w[f"{ex}.up_proj.weight"].t())
                out.index_add_(0, tok, (a @ w[f"{ex}.down_proj.weight"].t()) * weights[tok, slot, None])
            x = x + out
        x = self._norm(x, f"{lm}.norm.weight")
        return x @ w["lm_head.weight"].t()
