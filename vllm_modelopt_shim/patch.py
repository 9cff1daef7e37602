"""Everything that touches vLLM or wrapt: the only module that knows vLLM's names.

``apply(module)`` wraps ``Qwen3VLMoeForConditionalGeneration.load_weights`` (and ``__init__``, for
config fixes) in that class's own ``__dict__``: its base ``Qwen3VLForConditionalGeneration`` and
sibling subclasses stay untouched.  It never raises and never wraps twice; when vLLM does not look
as expected it logs one line and leaves vLLM stock.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time

from . import settings as _settings
from . import verify
from .errors import CheckpointError
from .ledger import STRIDE, Layer, Ledger
from .names import COMPRESSED, MODELOPT, family_of
from .stream import rewrite

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import ModuleType
    from typing import Any

__all__ = ["CLASS", "TESTED", "apply", "is_applied", "last_ledger", "reason", "remove", "target_class"]

CLASS = "Qwen3VLMoeForConditionalGeneration"
#: vLLM releases the test matrix proves; outside it the shim warns once and keeps working.
TESTED = ((0, 17, 1), (0, 33, 0))
_MARK = "_self_vllm_modelopt_shim"

logger = logging.getLogger("vllm.modelopt_shim")
_state: dict[str, Any] = {"applied": False, "reason": "not yet imported", "ledger": None}


def _warn(message: str) -> None:
    """One clear line, before vLLM's logging may exist: stderr, like the bootstrap."""
    sys.stderr.write(f"vllm-modelopt-shim: WARNING {message}\n")


def vllm_version() -> str:
    try:
        from importlib.metadata import version

        return version("vllm")
    except Exception:
        try:
            import vllm

            return str(getattr(vllm, "__version__", "unknown"))
        except Exception:
            return "unknown"


def _release(version: str) -> tuple[int, ...] | None:
    """(major, minor, patch) from a version string such as 0.32.0+cpu or 0.20.1rc1."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = re.match(r"\d+", piece)
        if digits is None:
            return None
        parts.append(int(digits.group()))
    return tuple(parts)


def untested(version: str) -> bool:
    """Outside the releases the matrix proves (any 0.33.x counts as tested); unknown: not flagged."""
    release = _release(version)
    return release is not None and not (TESTED[0] <= release <= (*TESTED[1][:2], 10**6))


def target_class(module: ModuleType) -> type | None:
    cls = getattr(module, CLASS, None)
    if isinstance(cls, type) and callable(getattr(cls, "load_weights", None)):
        return cls
    return None


def is_applied() -> bool:
    return bool(_state["applied"])


def reason() -> str:
    """Why the patch is, or is not, applied in this process."""
    return str(_state["reason"])


def last_ledger() -> Ledger | None:
    """The ledger of this process's most recent load (for status, reports and tests)."""
    return _state["ledger"]  # type: ignore[no-any-return]


def apply(module: ModuleType) -> bool:
    """Wrap the model class of ``module`` (vLLM's qwen3_vl_moe); True if the shim is active."""
    version = vllm_version()
    cls = target_class(module)
    if cls is None:
        _state["reason"] = f"{module.__name__}.{CLASS}.load_weights not found"
        _warn(f"vLLM {version}: {_state['reason']}; this vLLM is left untouched")
        return False
    current = cls.__dict__.get("load_weights")
    if getattr(current, _MARK, False):
        _state.update(applied=True, reason="applied")
        return True
    if not _settings.load().enabled:  # also the one place a bad VLLM_MODELOPT_SHIM* value warns
        _state["reason"] = f"{_settings.ENABLE} is off"
        return False
    try:
        import wrapt
    except ImportError:
        _state["reason"] = "wrapt is not installed"
        _warn(f"wrapt is not installed in {sys.prefix}: `pip install wrapt` there; vLLM {version} runs stock")
        return False
    if untested(version):
        _warn(
            f"vLLM {version} is outside the tested range "
            f"{'.'.join(map(str, TESTED[0]))}-{'.'.join(map(str, TESTED[1]))}; the shim stays active"
        )
    wrapt.wrap_function_wrapper(cls, "load_weights", _load_weights)
    setattr(cls.__dict__["load_weights"], _MARK, True)
    if "__init__" in cls.__dict__:
        wrapt.wrap_function_wrapper(cls, "__init__", _init)
        setattr(cls.__dict__["__init__"], _MARK, True)
    _state.update(applied=True, reason="applied")
    return True


def remove(module: ModuleType) -> None:
    """Undo ``apply`` (tests): restore the class's own methods exactly."""
    cls = target_class(module)
    if cls is None:
        return
    for name in ("load_weights", "__init__"):
        current = cls.__dict__.get(name)
        if getattr(current, _MARK, False):
            original = current.__wrapped__  # type: ignore[union-attr]
            if original is getattr(super(cls, cls), name, None):
                delattr(cls, name)  # it was inherited: leave no residue
            else:
                setattr(cls, name, original)
    _state.update(applied=False, reason="removed")


# -- the wrappers ----------------------------------------------------------------------------------
def _init(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    settings = _settings.load(warn=lambda _m: None)
    if settings.enabled:
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
        if hf_config is not None:
            from . import configfix

            try:
                for line in configfix.reconcile(hf_config, source=_config_source(vllm_config)):
                    logger.info("vllm-modelopt-shim: %s", line)
            except CheckpointError:
                raise  # a config that spells one setting two ways: refused on purpose
            except Exception as exc:  # anything else is our bug: never break a model that builds
                logger.warning("vllm-modelopt-shim: config check skipped (%s: %s)", type(exc).__name__, exc)
    return wrapped(*args, **kwargs)


def _config_source(vllm_config: Any) -> str | None:
    model = getattr(getattr(vllm_config, "model_config", None), "model", None)
    return model if isinstance(model, str) else None


def _item() -> Any:
    """How the stream reads a scale: ``Tensor.item`` itself, no wrapper (it runs 36,864 times per 30B load)."""
    from torch import Tensor

    return Tensor.item


def _family(instance: Any) -> str | None:
    model_config = getattr(instance, "model_config", None)
    method = getattr(model_config, "quantization", None)
    if method is None:
        qc = getattr(getattr(instance, "config", None), "quantization_config", None)
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return family_of(method)


def _num_experts(instance: Any) -> int | None:
    config = getattr(instance, "config", None)
    text = getattr(config, "text_config", config)
    for key in ("num_experts", "num_local_experts"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    return None


def _load_weights(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    settings = _settings.load(warn=lambda _m: None)
    if not settings.enabled:
        return wrapped(*args, **kwargs)
    if "weights" in kwargs:
        weights: Iterable[tuple[str, Any]] = kwargs.pop("weights")
    else:
        weights, args = args[0], args[1:]
    ledger = Ledger(_family(instance), _num_experts(instance))
    _state["ledger"] = ledger
    check = settings.verify != "off"
    on_problem = _raise if settings.verify == "error" else _log_problem
    scalar = _item() if check else None
    stored = _StoredScales(instance, ledger) if check and ledger.family in _SCALE_PARAMS else None
    handover = stored.handover if stored is not None else None
    stream = rewrite(weights, ledger, check=check, scalar=scalar, handover=handover, on_problem=on_problem)
    problems: list[CheckpointError] = []
    harmonized = None
    try:
        loaded = wrapped(stream, *args, **kwargs)
        stream.close()  # a loader that stopped early
        started = time.perf_counter()
        if stored is not None and ledger.deferred:
            stored.fill()
        problems = verify.check_complete(ledger) if check else []
        if problems and settings.verify == "error":
            raise verify.summarize(problems)
        for problem in problems[:10]:
            _log_problem(problem)
        if settings.harmonize and ledger.family in (MODELOPT, COMPRESSED) and ledger.layers:
            harmonized = _harmonize(instance, ledger.family == MODELOPT)
        ledger.seconds += time.perf_counter() - started
    except CheckpointError as exc:
        _report(settings.report_dir, ledger, problems or [exc], None)
        raise
    _summary(ledger, settings.verify, len(problems), harmonized)
    _report(settings.report_dir, ledger, problems, harmonized)
    return loaded


#: family -> scale suffix -> (vLLM's w13 parameter [experts, 2: gate, up], w2 parameter [experts])
_SCALE_PARAMS = {
    MODELOPT: {
        "weight_scale_2": ("w13_weight_scale_2", "w2_weight_scale_2"),
        "input_scale": ("w13_input_scale", "w2_input_scale"),
    },
    COMPRESSED: {
        "weight_global_scale": ("w13_weight_global_scale", "w2_weight_global_scale"),
        "input_global_scale": ("w13_input_global_scale", "w2_input_global_scale"),
    },
}
_LAYER = re.compile(r"layers\.(\d+)\.mlp\.experts(?:\.|$)")  # 0.32+ keeps them on experts.routed_experts


class _StoredScales:
    """Scale values as vLLM stored them, read per MoE layer in bulk after the load.

    Reading 36,864 scales one ``Tensor.item`` at a time cost a third of the shim's time.  The
    stream reads the first MoE layer's itself, then asks ``handover`` which (projection, suffix)
    slots vLLM stored exactly as read, expert for expert; only those slots of the later layers
    are taken from vLLM's parameters after the load.  Expert parallelism, unknown parameter
    shapes or any surprise: nothing is handed over and the stream keeps reading every tensor.
    """

    def __init__(self, model: Any, ledger: Ledger) -> None:
        self.model = model
        self.ledger = ledger
        self.params = _SCALE_PARAMS[ledger.family or ""]
        self.modules: dict[int, Any] | None = None

    def _table(self, prefix: str) -> dict[tuple[str, str], list[float]] | None:
        """(projection, suffix) -> value per expert, as stored for the layer ``prefix``; None if unsure."""
        import torch

        if self.modules is None:
            first = next(iter(self.params.values()))[0]
            found: dict[int, list[Any]] = {}
            for name, module in self.model.named_modules():
                match = _LAYER.search(name)
                if match is not None and isinstance(getattr(module, first, None), torch.Tensor):
                    found.setdefault(int(match.group(1)), []).append(module)
            self.modules = {layer: mods[0] for layer, mods in found.items() if len(mods) == 1}
        match = _LAYER.search(prefix)
        module = self.modules.get(int(match.group(1))) if match is not None else None
        if module is None or getattr(module, "expert_map", None) is not None:
            return None  # no module, or experts spread over ranks: local and global indices differ
        table: dict[tuple[str, str], list[float]] = {}
        for suffix, (w13_name, w2_name) in self.params.items():
            w13, w2 = getattr(module, w13_name, None), getattr(module, w2_name, None)
            if not isinstance(w13, torch.Tensor) or not isinstance(w2, torch.Tensor):
                return None
            if w2.dim() == 2 and w2.shape[1] == 1:
                w2 = w2[:, 0]
            if w13.dim() != 2 or w13.shape[1] != 2 or w2.dim() != 1 or w2.shape[0] != w13.shape[0]:
                return None
            gate, up = w13.detach().float().cpu().t().tolist()
            table["gate_proj", suffix], table["up_proj", suffix] = gate, up
            table["down_proj", suffix] = w2.detach().float().cpu().tolist()
        return table

    def handover(self, layer: Layer) -> set[tuple[str, str]]:
        """The (projection, suffix) slots whose values vLLM stored exactly as the stream read them.

        A gate/up slot qualifies only if some expert's gate and up values differ, in both the
        checkpoint and vLLM's parameter: vLLM releases that write one input scale over both halves
        (0.17) would otherwise look right.
        """
        try:
            table = self._table(layer.prefix)
            if table is None:
                return set()
            by_slot = {slot: key for key, slot in self.ledger.slots.items()}
            read: dict[tuple[str, str], dict[int, float]] = {}
            for index, value in layer.scalars.items():
                read.setdefault(by_slot[index % STRIDE], {})[index // STRIDE] = value
            same = set()
            for key, values in read.items():
                column = table.get(key)
                if column is not None and all(
                    e < len(column) and (column[e] == v or (math.isnan(column[e]) and math.isnan(v)))
                    for e, v in values.items()
                ):
                    same.add(key)
            handed = set()
            for proj, suffix in same:
                if proj == "down_proj":
                    handed.add((proj, suffix))
                    continue
                gate, up = read.get(("gate_proj", suffix), {}), read.get(("up_proj", suffix), {})
                if {("gate_proj", suffix), ("up_proj", suffix)} <= same and any(
                    e in up and up[e] != v for e, v in gate.items()
                ):
                    handed.add((proj, suffix))
            return handed
        except Exception as exc:  # never break a load over an optimization
            logger.debug("vllm-modelopt-shim: scale values stay read per tensor (%s)", exc)
            return set()

    def fill(self) -> None:
        """After the load: every scale value the stream did not read, from vLLM's parameters."""
        unchecked = []
        for layer in self.ledger.layers.values():
            unread = list(self.ledger.unread(layer))
            try:
                table = self._table(layer.prefix) if unread else None
            except Exception:  # never break a load over an optimization
                table = None
            if unread and table is None:
                unchecked.append(layer.prefix)
                continue
            for index, expert, proj, suffix in unread:
                column = table.get((proj, suffix)) if table is not None else None
                if column is not None and expert < len(column):
                    layer.scalars[index] = column[expert]
        if unchecked:  # cannot happen after a verified handover, short of vLLM changing under our feet
            logger.warning("vllm-modelopt-shim: scale values of %s not checked: vLLM's layout changed", unchecked)


def _report(directory: str | None, ledger: Ledger, problems: list[CheckpointError], harmonized: Any) -> None:
    if not directory:
        return
    from . import report

    try:
        logger.info("vllm-modelopt-shim: report written to %s", report.write(directory, ledger, problems, harmonized))
    except OSError as exc:  # a report must never fail a load
        logger.warning("vllm-modelopt-shim: report not written to %s: %s", directory, exc)


def _harmonize(model: Any, modelopt: bool) -> Any:
    """Fold gate/up global scales on vLLM's w13 parameters, before vLLM post-processes them."""
    import torch

    from . import harmonize

    total = harmonize.Result()
    glob_name, weight_name = (
        ("w13_weight_scale_2", "w13_weight") if modelopt else ("w13_weight_global_scale", "w13_weight_packed")
    )
    with torch.no_grad():
        for module in model.modules():
            scales, glob = getattr(module, "w13_weight_scale", None), getattr(module, glob_name, None)
            weights = getattr(module, weight_name, None)
            if not isinstance(scales, torch.Tensor) or not isinstance(glob, torch.Tensor):
                continue
            if (
                scales.dtype != torch.float8_e4m3fn
                or scales.dim() != 3
                or scales.shape[1] % 2
                or glob.dim() != 2
                or tuple(glob.shape) != (scales.shape[0], 2)
            ):
                continue  # not the layout this fold understands: leave it exactly as loaded
            packed = weights.data if isinstance(weights, torch.Tensor) and weights.dtype == torch.uint8 else None
            if packed is not None and tuple(packed.shape[:2]) != tuple(scales.shape[:2]):
                packed = None  # energies unknown: every block counts equally
            total.add(harmonize.fold(scales.data, glob.data, packed, reciprocal=not modelopt))
    return total if total.experts else None


def _raise(problem: CheckpointError) -> None:
    raise problem


def _log_problem(problem: CheckpointError) -> None:
    logger.warning("vllm-modelopt-shim: %s (VLLM_MODELOPT_SHIM_VERIFY=warn: not refused)", problem)


def _summary(ledger: Ledger, mode: str, problems: int, harmonized: Any) -> None:
    experts = ledger.complete_experts()
    verified = f"{experts} experts verified" if mode != "off" else "verification off"
    refused = f", {len(ledger.refused)} refused" if ledger.refused else ""
    issues = f", {problems} problem(s) logged" if problems else ""
    logger.info(
        "vllm-modelopt-shim: %d tensors seen, %d renamed%s, %s in %d MoE layers%s, %.3f s in the shim",
        ledger.seen,
        ledger.renamed,
        refused,
        verified,
        len(ledger.layers),
        issues,
        ledger.seconds,
    )
    if harmonized is not None:
        logger.info("vllm-modelopt-shim: %s", harmonized)
