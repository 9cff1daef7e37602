"""The stream's side of the NVFP4_AWQ folds (``awq`` holds the arithmetic): hold, then forward folded.

A fold needs tensors that stream past at different times, in any order: a MoE layer's norm and
router wait for every gate/up ``pre_quant_scale`` of the layer; v_proj's block scales and o_proj's
global scale wait for o_proj's p.  Each goes on the moment its fold is decided; what never meets its
partners goes on as read when the load ends (the coverage check names a missing p).  down_proj's p
travels with up's block scales in ``harmonize.Folder`` (``rows``).  Only whole-checkpoint loads fold;
a weight update carrying p is refused before it gets here (verify).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import awq
from .awq import EXPERTS as _EXPERTS
from .awq import NORM, O_GLOBAL, O_P, ROUTER, V_BLOCK, Shapes
from .errors import CheckpointError

__all__ = ["AwqFolder"]

Out = list[tuple[str, Any]]


@dataclass(slots=True)
class Layer:
    """One decoder layer's held tensors: its MoE gate/up p, norm and router; its attention's pieces."""

    ps: dict[tuple[str, int], Any] = field(default_factory=dict)  # (proj, expert) -> float32 p
    norm: tuple[str, Any] | None = None
    router: tuple[str, Any] | None = None
    o_p: tuple[str, Any] | None = None  # name, float32 p
    o_global: tuple[str, Any] | None = None
    v_block: tuple[str, Any] | None = None
    moe_done: bool = False
    attention_done: bool = False


class AwqFolder:
    """Per load: takes the tensors the AWQ folds read, returns what to forward now."""

    def __init__(self, shapes: Shapes, num_experts: int | None) -> None:
        self.shapes = shapes
        self.num_experts = num_experts or 0
        self.layers: dict[str, Layer] = {}
        self.tally = awq.Tally()
        self.error: str | None = None  # an internal error stopped the folds: held tensors went on as read
        self.lost = 0  # pre_quant_scale tensors taken after that (not applied)
        self.missing: list[CheckpointError] = []  # tensors a fold needed that the load never brought

    def _fail(self, exc: Exception) -> Out:
        """Our bug: never break a load over it.  Everything held goes on as read; p is no longer applied."""
        if self.error is None:
            self.error = f"{type(exc).__name__}: {exc}"
        return self.drop()

    def p(self, name: str, proj: str, tensor: Any) -> Any:
        """A ``pre_quant_scale`` as float32 numpy, checked (``awq.check``: raises what it finds)."""
        import torch

        t = tensor.detach() if tensor.requires_grad else tensor
        values = t.to(torch.float32).cpu().numpy() if t.is_floating_point() else None
        problem = awq.check(name, proj, values, self.shapes.length(proj))
        if problem is not None:
            raise problem
        return values

    # -- in --------------------------------------------------------------------------------------
    def expert_p(self, prefix: str, expert: int, proj: str, name: str, p: Any) -> Out:
        """A gate/up p (checked) of ``prefix`` (``<layer>.mlp.experts``): held for the layer's mean."""
        if self.error is not None:
            self.lost += 1
            return []
        try:
            layer = self._layer(prefix[: -len(_EXPERTS)])
            layer.ps[(proj, expert)] = (name, p)
            return self._moe(prefix[: -len(_EXPERTS)], layer)
        except Exception as exc:
            return self._fail(exc)

    def take(self, name: str, tensor: Any) -> Out | None:
        """A tensor the folds read (norm, router, o_proj's p or global scale, v's block scales): what to
        forward now; None for every other tensor (forward it)."""
        if self.error is not None:
            return None
        try:
            return self._take(name, tensor)
        except Exception as exc:
            out = self._fail(exc)
            return out if any(t is tensor for _, t in out) else [*out, (name, tensor)]

    def _take(self, name: str, tensor: Any) -> Out | None:
        for tail, slot in ((NORM, "norm"), (ROUTER, "router"), (V_BLOCK, "v_block"), (O_GLOBAL, "o_global")):
            if name.endswith(tail):
                key = name[: -len(tail)]
                layer = self._layer(key)
                moe = slot in ("norm", "router")
                if layer.moe_done if moe else layer.attention_done:
                    return None  # its fold is decided: a second copy goes as read
                setattr(layer, slot, (name, tensor))
                return self._moe(key, layer) if moe else self._attention(key, layer)
        return None

    def o_p(self, name: str, p: Any) -> Out:
        """o_proj's p (checked): held until v's block scales and o's global scale are in."""
        if self.error is not None:
            self.lost += 1
            return []
        try:
            key = name[: -len(O_P)]
            layer = self._layer(key)
            layer.o_p = (name, p)
            return self._attention(key, layer)
        except Exception as exc:
            return self._fail(exc)

    def drop(self) -> Out:
        """End of the load: everything still held goes as read (its fold never got what it needs)."""
        out: Out = []
        for key, layer in self.layers.items():
            if self.error is None:
                self._missing(key, layer)
            self.tally.unapplied += len(layer.ps) + (layer.o_p is not None)
            held = [] if layer.moe_done else [layer.norm, layer.router]
            held += [] if layer.attention_done else [layer.v_block, layer.o_global]
            out += [x for x in held if x is not None]
        self.layers.clear()
        return out

    # -- inside --------------------------------------------------------------------------------
    def _missing(self, key: str, layer: Layer) -> None:
        """What a held p's fold never got (the coverage check names missing p themselves)."""
        pieces = []
        if layer.ps and not layer.moe_done:
            by = next(iter(layer.ps.values()))[0]
            pieces += [(key + tail, by) for tail, held in ((NORM, layer.norm), (ROUTER, layer.router)) if held is None]
        if layer.o_p is not None and not layer.attention_done:
            held = ((V_BLOCK, layer.v_block), (O_GLOBAL, layer.o_global))
            pieces += [(key + tail, layer.o_p[0]) for tail, piece in held if piece is None]
        self.missing += [awq.needed(name, by) for name, by in pieces]

    def _layer(self, key: str) -> Layer:
        layer = self.layers.get(key)
        if layer is None:
            layer = self.layers[key] = Layer()
        return layer

    def _moe(self, key: str, layer: Layer) -> Out:
        """The layer's gate/up p mean into its norm, the router compensated, once all are in."""
        if layer.norm is None or layer.router is None or len(layer.ps) < 2 * self.num_experts or layer.moe_done:
            return []
        mean = awq.common({k: p for k, (_, p) in layer.ps.items()})
        for name, p in layer.ps.values():
            self.tally.add(name, awq.residual(p, mean))
        (norm_name, norm), (router_name, router) = layer.norm, layer.router
        new_norm = _like(norm, awq.scale_columns(_f32(norm), mean))
        new_router = _like(router, awq.scale_columns(_f32(router), mean, divide=True))
        layer.moe_done, layer.ps, layer.norm, layer.router = True, {}, None, None
        return [(norm_name, new_norm), (router_name, new_router)]

    def _attention(self, key: str, layer: Layer) -> Out:
        """o_proj's p into v's block scales (o's global scale takes the power of two), once all are in."""
        if layer.o_p is None or layer.v_block is None or layer.o_global is None or layer.attention_done:
            return []
        import torch

        (p_name, p), (v_name, v), (g_name, g) = layer.o_p, layer.v_block, layer.o_global
        shapes = self.shapes
        codes = (v if v.is_cpu else v.cpu()).view(torch.uint8).numpy()
        fold = awq.AttentionFold.of(p, codes, shapes.heads, shapes.kv_heads)
        self.tally.add(p_name, fold.left)
        new_v = torch.from_numpy(fold.v_codes).view(v.dtype).to(v.device)
        new_g = g * 2.0**fold.shift if fold.shift else g
        layer.attention_done, layer.o_p, layer.v_block, layer.o_global = True, None, None, None
        return [(v_name, new_v), (g_name, new_g)]


def _f32(t: Any) -> Any:
    """A bf16/fp16/fp32 tensor as float32 numpy (bf16 via its bits, as ``awq.from_bits`` reads them)."""
    import torch

    t = (t.detach() if t.requires_grad else t).cpu()
    if t.dtype == torch.bfloat16:
        return awq.from_bits(t.view(torch.int16).numpy().view("uint16"), "bfloat16")
    return awq.from_bits(t.numpy(), str(t.dtype).removeprefix("torch."))


def _like(t: Any, x: Any) -> Any:
    """float32 numpy ``x`` as a tensor of ``t``'s dtype and device (rounded by ``awq.to_bits``)."""
    import torch

    if t.dtype == torch.bfloat16:
        new = torch.from_numpy(awq.to_bits(x, "bfloat16").view("int16")).view(torch.bfloat16)
    else:
        new = torch.from_numpy(awq.to_bits(x, str(t.dtype).removeprefix("torch.")))
    return new if t.device.type == "cpu" else new.to(t.device)
