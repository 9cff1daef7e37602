"""Give gate and up of each expert one global scale, folding the ratio into the fp8 block scales.

vLLM fuses gate_proj and up_proj into w13 and, after loading, dequantizes both halves with the
gate's global scale (ModelOpt ``weight_scale_2[:, 0]``; compressed-tensors
``weight_global_scale[:, 0]``, the reciprocal).  ModelOpt's per-expert export often gives the two
different scales (up to 14% apart measured), so up_proj would be dequantized that far off.

For each expert whose two scales differ we pick one common scale ``c`` and rescale each half's
block scales by ``own / c``, rounding to fp8 e4m3 (never above its maximum, 448):

- ``c = gate`` when up's largest block still fits: gate stays exact, up is off by fp8 rounding only;
- otherwise candidates ``c >= c_min`` (the smallest that keeps up within 448) are tried: a few steps
  above ``c_min``, and ``gate * 2**k`` (rescaling gate by a power of two is exact in fp8); the one
  whose worse half, measured against the targets (gate 2%, up 4%), is smallest wins.

The error of a candidate is computed exactly from the e2m1 codes: each block contributes
``(q(s*own/c)*c - s*own)**2 * sum(e2m1**2)``.  Works on tensors only; ``patch`` finds them.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Result", "fold"]

FP8_MAX = 448.0
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_CANDIDATES = 8  # c_min * (1 + k/16) for k < 8: the fp8 mantissa step is 1/8
_TARGET_GATE, _TARGET_UP = 0.02, 0.04  # relative L2 error targets: gate matters more (kept exact if possible)


class Result:
    """What one fold did: experts changed, and the worst relative L2 error before and after."""

    __slots__ = ("experts", "harmonized", "worst_after", "worst_before")

    def __init__(self) -> None:
        self.experts = 0
        self.harmonized = 0
        self.worst_before = 0.0  # of up_proj dequantized with gate's scale (vLLM without the fold)
        self.worst_after = 0.0  # of either half after the fold

    def add(self, other: Result) -> None:
        self.experts += other.experts
        self.harmonized += other.harmonized
        self.worst_before = max(self.worst_before, other.worst_before)
        self.worst_after = max(self.worst_after, other.worst_after)

    def __str__(self) -> str:
        return (
            f"harmonized gate/up global scales of {self.harmonized} of {self.experts} experts: worst relative "
            f"error {100 * self.worst_before:.1f}% -> {100 * self.worst_after:.1f}% (fp8 rounding)"
        )


def _energy_table() -> torch.Tensor:
    """byte -> sum of squares of its two e2m1 values."""
    sq = torch.tensor([v * v for v in _E2M1] * 2, dtype=torch.float64)
    codes = torch.arange(256)
    return sq[codes & 0xF] + sq[codes >> 4]


def _block_energy(packed: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[rows, K/2] uint8 -> [rows, K/16] sum of squared e2m1 values per 16-element block."""
    e = table[packed.long()]
    return e.view(packed.shape[0], -1, 8).sum(-1)


def _representable(c: float, reciprocal: bool) -> float:
    """The common scale as it will be stored (float32, or its float32 reciprocal) and so used."""
    stored = float(torch.tensor(1.0 / c if reciprocal else c, dtype=torch.float32))
    return 1.0 / stored if reciprocal else stored


def _requant(scale: torch.Tensor, ratio: float) -> torch.Tensor:
    return (scale.double() * ratio).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)


def _error(old: torch.Tensor, new: torch.Tensor, own: float, c: float, energy: torch.Tensor) -> tuple[float, float]:
    """(squared error, squared norm) of one half: blocks ``old`` at ``own`` vs ``new`` at ``c``."""
    exact = old.double() * own
    diff = new.double() * c - exact
    return float((diff * diff * energy).sum()), float((exact * exact * energy).sum())


def fold(
    block_scales: torch.Tensor,
    global_scales: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    reciprocal: bool,
) -> Result:
    """Harmonize w13 in place: ``block_scales`` fp8 [E, 2I, K/16], ``global_scales`` [E, 2] ([gate, up]).

    ``reciprocal`` for compressed-tensors, whose global scale divides.  ``weights`` (uint8
    [E, 2I, K/2]) give the error weighting; without them every block counts equally.
    """
    result = Result()
    experts, rows = block_scales.shape[0], block_scales.shape[1] // 2
    table = _energy_table().to(block_scales.device)
    for e in range(experts):
        result.experts += 1
        g_raw, u_raw = float(global_scales[e, 0]), float(global_scales[e, 1])
        if g_raw == u_raw or not all(math.isfinite(x) and x > 0 for x in (g_raw, u_raw)):
            continue
        g, u = (1.0 / g_raw, 1.0 / u_raw) if reciprocal else (g_raw, u_raw)
        gate, up = block_scales[e, :rows], block_scales[e, rows:]
        if weights is not None:
            energy = _block_energy(weights[e].reshape(2 * rows, -1), table)
        else:
            energy = torch.ones(block_scales.shape[1:], dtype=torch.float64, device=block_scales.device)
        e_gate, e_up = energy[:rows], energy[rows:]
        up_max = float(up.float().max())
        c_min = max(g, u * up_max / FP8_MAX) if up_max > 0 else g
        if c_min <= g:
            candidates = [g]
        else:
            candidates = [c_min * (1 + k / 16) for k in range(_CANDIDATES)]
            candidates += [g * 2**k for k in range(1, 4) if g * 2**k >= c_min]
        best = None
        for wanted in candidates:
            c = _representable(wanted, reciprocal) if wanted != g else g
            new_gate = gate if c == g else _requant(gate, g / c)
            new_up = _requant(up, u / c)
            eg, ng = _error(gate, new_gate, g, c, e_gate)
            eu, nu = _error(up, new_up, u, c, e_up)
            err_gate, err_up = (math.sqrt(eg / ng) if ng else 0.0), (math.sqrt(eu / nu) if nu else 0.0)
            score = max(err_gate / _TARGET_GATE, err_up / _TARGET_UP)
            if best is None or score < best[0]:
                best = (score, c, new_gate, new_up, err_gate, err_up)
        assert best is not None
        _, c, new_gate, new_up, err_gate, err_up = best
        block_scales[e, :rows] = new_gate
        block_scales[e, rows:] = new_up
        # vLLM reads column 0 only; both columns hold the common scale so any reader agrees
        stored = g_raw if c == g else (1.0 / c if reciprocal else c)
        global_scales[e, 0] = stored
        global_scales[e, 1] = stored
        result.harmonized += 1
        result.worst_before = max(result.worst_before, abs(g - u) / u)
        result.worst_after = max(result.worst_after, err_gate, err_up)
    return result
