"""The benchmark's figures: targets, paired statistics, the printed table.  Stdlib only."""

from __future__ import annotations

import statistics
from typing import Any

#: figure -> (full-run target, --quick target, unit, what it is); a figure passes when <= its target
TARGETS: dict[str, tuple[float, float, str, str]] = {
    "startup_ratio": (1.15, 1.15, "x", "`python -c pass`, checkout on PYTHONPATH over without"),
    "load_overhead_ratio": (1.02, 1.05, "x", "census load_weights, defaults: shim (legacy) over stock (canonical)"),
    "real_load_ratio": (1.05, 1.10, "x", "real-size load_weights, defaults: shim (legacy) over stock (canonical)"),
    "fold_s_per_layer": (0.1, 0.1, "s", "the stream's Folder on one real-size MoE layer (128 experts, all apart)"),
    "interleaved_ratio": (1.2, 1.2, "x", "the shim's stream, layers interleaved over in order"),
    "extra_rss_mib": (64.0, 64.0, "MiB", "census load: peak RSS, shim minus stock"),
    "real_extra_rss_mib": (256.0, 256.0, "MiB", "real-size load: peak RSS, shim minus stock"),
    "doctor_s": (1.0, 2.0, "s", "`doctor DIR --json` on the 8-shard census copy"),
    "convert_exact_ratio": (1.2, 1.2, "x", "`convert --no-harmonize` of 8 real-size layers (4 shards) over `cp -r`"),
    "convert_ratio": (1.5, 1.5, "x", "`convert` (harmonizing) of 8 real-size layers (4 shards) over `cp -r`"),
}


def target(key: str, quick: bool) -> float:
    return TARGETS[key][1 if quick else 0]


def passes(key: str, value: float, quick: bool) -> bool:
    return value <= target(key, quick)


def paired(on: list[dict[str, Any]], off: list[dict[str, Any]]) -> dict[str, Any]:
    """Interleaved (shim, stock) loads -> median of paired ratios, peak-RSS differences, shim time."""
    ratios = [a["load_s"] / b["load_s"] for a, b in zip(on, off, strict=True)]
    rss = [a["maxrss_mib"] - b["maxrss_mib"] for a, b in zip(on, off, strict=True)]
    shim_s = [a["shim_s"] for a in on]
    return {
        "pairs": len(ratios),
        "shim_load_s": [round(a["load_s"], 4) for a in on],
        "stock_load_s": [round(b["load_s"], 4) for b in off],
        "paired_ratios": [round(r, 4) for r in ratios],
        "ratio": statistics.median(ratios),
        "extra_rss_mib": statistics.median(rss),
        "shim_maxrss_mib": [round(a["maxrss_mib"], 1) for a in on],
        "stock_maxrss_mib": [round(b["maxrss_mib"], 1) for b in off],
        "shim_s": [round(s, 4) for s in shim_s],
        # process CPU seconds of each load: where the wall time of a pair differs by more than the shim's
        # own seconds, whether it ran or waited
        "shim_cpu_s": [round(a["load_cpu_s"], 4) for a in on],
        "stock_cpu_s": [round(b["load_cpu_s"], 4) for b in off],
        # seconds the loading thread waited runnable while other processes held the cores (0 on a quiet machine)
        "shim_queued_s": [round(a.get("queued_s", 0.0), 3) for a in on],
        "stock_queued_s": [round(b.get("queued_s", 0.0), 3) for b in off],
        "shim_us_per_tensor": statistics.median(s / a["seen"] * 1e6 for s, a in zip(shim_s, on, strict=True)),
        # (stock + the shim's own seconds) / stock, medians: what the shim adds by its own clock, free of
        # the spread of the stock loads that dominates the paired ratios on a noisy machine
        "own_ratio": 1 + statistics.median(shim_s) / statistics.median(b["load_s"] for b in off),
        # Python's garbage collections during load_weights, [gen 0, 1, 2] and seconds, per load
        "shim_gc": [[*a["gc_collections"], round(a["gc_s"], 3)] for a in on],
        "stock_gc": [[*b["gc_collections"], round(b["gc_s"], 3)] for b in off],
    }


def table(figures: dict[str, Any], quick: bool) -> str:
    m, d = figures["machine"], figures["details"]
    lines = [
        f"vllm-modelopt-shim benchmark ({'--quick' if quick else 'full run'}), {figures['date']}, default settings",
        f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB; vLLM {m['vllm']}, torch {m['torch']}, "
        f"python {m['python']}; checkout {m['commit']}",
        "",
    ]
    rows = [("figure", "value", "target", "result")]
    for key, (_, _, unit, _) in TARGETS.items():
        value = figures[key]
        fmt = "{:.3f}" if unit in ("x", "s") else "{:.1f}"
        rows.append((key, f"{fmt.format(value)} {unit}", f"<= {target(key, quick):g} {unit}",
                     "PASS" if passes(key, value, quick) else "FAIL"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    census, real, fold, stream = d["census"], d["real"], d["fold"], d["stream"]
    lines += [
        "",
        "details:",
        f"  census ({census['pairs']} pairs): shim {statistics.median(census['shim_load_s']):.2f} s, stock "
        f"{statistics.median(census['stock_load_s']):.2f} s, paired ratios {census['paired_ratios']}; "
        f"the shim's own time {census['shim_s']} s ({census['shim_us_per_tensor']:.2f} us per tensor; "
        f"stock + own over stock {census['own_ratio']:.3f} x)",
        f"  real size ({real['pairs']} pairs): shim {statistics.median(real['shim_load_s']):.2f} s, stock "
        f"{statistics.median(real['stock_load_s']):.2f} s, paired ratios {real['paired_ratios']}; shim time "
        f"{real['shim_s']} s (stock + own over stock {real['own_ratio']:.3f} x); peak RSS shim "
        f"{real['shim_maxrss_mib']}, stock {real['stock_maxrss_mib']} MiB",
        f"  garbage collections while loading, [gen 0, 1, 2, seconds] per load: census shim {census['shim_gc']}, "
        f"stock {census['stock_gc']}; real size shim {real['shim_gc']}, stock {real['stock_gc']}",
        f"  run-queue waits while loading (s, per load; other processes on the cores): census shim "
        f"{census['shim_queued_s']}, stock {census['stock_queued_s']}; real size shim {real['shim_queued_s']}, "
        f"stock {real['stock_queued_s']}",
        f"  fold (the Folder taking one layer's {fold['pieces']} gate/up scale pieces): {fold['experts']} experts, "
        f"{fold['changed']} changed, {fold['seconds']} s, extra peak {fold['extra_peak_mib']:.1f} MiB",
        f"  stream ({stream['tensors']} tensors, in memory): "
        + ", ".join(f"{k} {v:.3f} s" for k, v in stream["median_s"].items())
        + f"; paired ratios over ordered: interleaved {stream['interleaved_ratio']:.3f}, reversed "
        f"{stream['reversed_ratio']:.3f}",
        f"  start-up: {d['startup']['median_ms']} ms; doctor {d['doctor']['seconds']} s",
        f"  convert ({d['convert']['layers']} layers, {d['convert']['mib']:.0f} MiB): cp {d['convert']['cp_s']} s, "
        f"--no-harmonize {d['convert']['exact_s']} s, default {d['convert']['default_s']} s",
    ]
    misses = [k for k in TARGETS if not passes(k, figures[k], quick)]
    lines += ["", f"TARGETS MISSED: {', '.join(misses)}" if misses else "all targets met"]
    return "\n".join(lines)
