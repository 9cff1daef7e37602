"""Everything that touches vLLM or wrapt: the only module that knows vLLM's names.

``apply(module)`` wraps ``Qwen3VLMoeForConditionalGeneration.load_weights`` (and ``__init__``, for
config fixes) in that class's own ``__dict__``: its base ``Qwen3VLForConditionalGeneration`` and
sibling subclasses stay untouched.  It never raises and never wraps twice; when vLLM does not look
as expected it logs one line and leaves vLLM stock.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
import weakref

from . import awq, epfilter, verify
from . import settings as _settings
from .errors import CheckpointError
from .ledger import Ledger
from .names import COMPRESSED, MODELOPT, family_of
from .stream import rewrite

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import ModuleType
    from typing import Any

__all__ = [
    "CLASS",
    "TESTED",
    "apply",
    "apply_config",
    "full_load",
    "is_applied",
    "last_ledger",
    "reason",
    "remove",
    "target_class",
]

CLASS = "Qwen3VLMoeForConditionalGeneration"
#: vLLM releases the test matrix proves; outside it the shim warns once and keeps working.
TESTED = ((0, 17, 1), (0, 34, 0))
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
    """Outside the releases the matrix proves (any patch release of the newest tested minor counts);
    unknown: not flagged."""
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
    epfilter.apply()
    _state.update(applied=True, reason="applied")
    return True


# -- NVFP4_AWQ at config validation ----------------------------------------------------------------
#: the config base class whose ``from_config`` refuses AWQ_ALGO ("ModelOpt currently only supports")
CONFIG_CLASS = "ModelOptQuantConfigBase"
#: frames above the wrapper searched for the caller's ``model_config`` (vLLM's get_quant_config)
_FRAMES = 6


#: where a checkpoint whose config.json lacks quantization_config (hf_quant_config.json only) is refused
#: first ("Unknown ModelOpt quant algo"): the hf_config's normalization, every release tested
CONVERTOR_CLASS, NORMALIZE = "ModelArchConfigConvertorBase", "_normalize_quantization_config"


def apply_config(module: ModuleType) -> bool:
    """Let vLLM's config validation read a Qwen3-VL-MoE NVFP4_AWQ checkpoint as NVFP4 (the shim folds its
    p while loading): wrap ``ModelOptQuantConfigBase.from_config`` (vLLM's modelopt quantization module)
    or ``ModelArchConfigConvertorBase._normalize_quantization_config`` (its config convertor module),
    whichever ``module`` is.  Runs in every process that imports them (the API server validates the
    config and may never import qwen3_vl_moe).  Never raises; True if wrapped.  Without wrapt it stays
    silent: ``apply`` says so, once."""
    try:
        import wrapt
    except ImportError:
        return False
    for cls_name, method, wrapper in (
        (CONFIG_CLASS, "from_config", _from_config),
        (CONVERTOR_CLASS, NORMALIZE, _normalize),
    ):
        cls = getattr(module, cls_name, None)
        if not isinstance(cls, type):
            continue
        try:
            current = cls.__dict__.get(method)
            if current is None:
                break
            if getattr(current, _MARK, False):
                return True
            wrapt.wrap_function_wrapper(cls, method, wrapper)
            setattr(cls.__dict__[method], _MARK, True)
            return True
        except Exception as exc:  # never break vLLM's import
            _warn(f"NVFP4_AWQ config acceptance not installed ({type(exc).__name__}: {exc}); vLLM refuses it as stock")
            return False
    _warn(f"{module.__name__}: no {CONFIG_CLASS}.from_config or {CONVERTOR_CLASS}.{NORMALIZE}; NVFP4_AWQ stays refused")
    return False


def _accept_awq(architectures: Any) -> bool:
    """NVFP4_AWQ is read as NVFP4 for Qwen3-VL-MoE alone, with the shim on and VLLM_MODELOPT_SHIM_AWQ=fold."""
    try:
        settings = _settings.load()
        return settings.enabled and settings.awq == "fold" and CLASS in (architectures or ())
    except Exception:  # never break vLLM: it refuses AWQ as stock
        return False


def _normalize(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """hf_quant_config.json's ``quantization.quant_algo`` reads NVFP4 while vLLM normalizes it (it raises
    on any other algo), and NVFP4_AWQ again afterwards, for ``_from_config`` to see."""
    config = args[0] if args else kwargs.get("config")
    quant = getattr(config, "quantization_config", None)
    inner = quant.get("quantization") if isinstance(quant, dict) else None
    if not isinstance(inner, dict) or not awq.is_awq_config(quant):
        return wrapped(*args, **kwargs)
    architectures = getattr(getattr(instance, "hf_config", None), "architectures", None)
    if not _accept_awq(architectures):
        return wrapped(*args, **kwargs)
    algo = inner["quant_algo"]
    inner["quant_algo"] = awq.NVFP4
    try:
        return wrapped(*args, **kwargs)
    finally:
        inner["quant_algo"] = algo


def _caller_architectures() -> list[str] | None:
    """The architectures of the ``model_config`` a caller up the stack holds (vLLM's get_quant_config)."""
    frame: Any = sys._getframe(2)
    for _ in range(_FRAMES):
        if frame is None:
            return None
        model_config = frame.f_locals.get("model_config")
        if model_config is not None:
            hf_config = getattr(model_config, "hf_config", None)
            found = getattr(hf_config, "architectures", None) or getattr(model_config, "architectures", None)
            return list(found) if isinstance(found, (list, tuple)) else None
        frame = frame.f_back
    return None


def _from_config(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    config = args[0] if args else kwargs.get("config")
    if not isinstance(config, dict) or not awq.is_awq_config(config):
        return wrapped(*args, **kwargs)
    if not _accept_awq(_caller_architectures()):
        return wrapped(*args, **kwargs)
    quant_config = wrapped(awq.as_nvfp4(config), *args[1:], **{k: v for k, v in kwargs.items() if k != "config"})
    with contextlib.suppress(Exception):
        setattr(quant_config, _AWQ_MARK, True)
    logger.info(
        "vllm-modelopt-shim: quant_algo NVFP4_AWQ read as NVFP4; pre_quant_scale is folded while loading "
        "(%s=refuse to refuse)",
        _settings.AWQ,
    )
    return quant_config


#: set on a quant config made from an NVFP4_AWQ config (so the load knows, whatever config.json says)
_AWQ_MARK = "vllm_modelopt_shim_awq"


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
        made = wrapped(*args, **kwargs)
        if getattr(getattr(vllm_config, "quant_config", None), _AWQ_MARK, False):
            with contextlib.suppress(TypeError):
                _AWQ_MODELS.add(instance)
        return made
    return wrapped(*args, **kwargs)


def _config_source(vllm_config: Any) -> str | None:
    model = getattr(getattr(vllm_config, "model_config", None), "model", None)
    return model if isinstance(model, str) else None


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
    full, local = full_load(weights)
    ledger = Ledger(_family(instance), _num_experts(instance), full=full)
    _state["ledger"] = ledger
    check = settings.verify != "off"
    on_problem = _raise if settings.verify == "error" else _log_problem
    awq_fold = _awq_folder(instance, ledger) if full and settings.awq == "fold" else None
    folder = _folder(instance, ledger) if settings.harmonize or awq_fold is not None else None
    if folder is not None:
        folder.rows = awq_fold is not None
        if full:
            folder.reset()
    scalar = _item() if check else None
    stream = rewrite(
        weights, ledger, check=check, scalar=scalar, on_problem=on_problem, fold=folder, final=full, awq=awq_fold
    )
    problems: list[CheckpointError] = []
    try:
        loaded = wrapped(stream, *args, **kwargs)
        stream.close()  # a loader that stopped early
        try:
            started = time.perf_counter()
            problems = verify.check_complete(ledger, full=full, experts=local) if check else []
            problems += awq_fold.missing if awq_fold is not None and check else []
            ledger.seconds += time.perf_counter() - started
        except Exception as exc:  # our bug, after the weights are in: never fail a load over it
            logger.warning("vllm-modelopt-shim: checks after loading skipped (%s: %s)", type(exc).__name__, exc)
        if problems and settings.verify == "error":
            raise verify.summarize(problems)
        for problem in problems[:10]:
            _log_problem(problem)
    except CheckpointError as exc:
        if full:
            _report(settings.report_dir, ledger, problems or [exc], None)
        raise
    harmonized = folder.result if folder is not None and full and folder.result.experts else None
    if folder is not None and folder.error is not None:
        logger.warning(
            "vllm-modelopt-shim: harmonization stopped (%s); every expert not yet folded is loaded as the "
            "checkpoint holds it%s",
            folder.error,
            " (NVFP4_AWQ: their down_proj pre_quant_scale NOT applied; please report this)" if folder.rows else "",
        )
        folder.error = None
    if awq_fold is not None and awq_fold.error is not None:
        logger.warning(
            "vllm-modelopt-shim: NVFP4_AWQ folding stopped (%s); %d pre_quant_scale tensors after it were not "
            "applied: outputs drift from the checkpoint's model; please report this",
            awq_fold.error,
            awq_fold.lost,
        )
    try:
        _summary(ledger, settings.verify, len(problems), harmonized, full)
        if awq_fold is not None and folder is not None:
            awq_fold.tally.exact += folder.result.rows
            if awq_fold.tally.exact or awq_fold.tally.residual or awq_fold.tally.unapplied:
                (logger.warning if awq_fold.tally.unapplied else logger.info)("vllm-modelopt-shim: %s", awq_fold.tally)
    except Exception as exc:  # a log line must never fail a load
        logger.warning("vllm-modelopt-shim: no summary (%s: %s)", type(exc).__name__, exc)
    if full:
        _report(settings.report_dir, ledger, problems, harmonized)
    return loaded


def _item() -> Any:
    """How the stream reads a scale: ``Tensor.item`` itself, no wrapper."""
    from torch import Tensor

    return Tensor.item


def full_load(weights: object) -> tuple[bool, frozenset[int] | None]:
    """Whether ``weights`` is a whole checkpoint, and the experts this rank holds (None: all).

    The rule: a full load is an iterator made by a vLLM model loader's ``get_all_weights`` (the
    initial load and ``reload_weights`` from disk hand it over as it is); every other call (weight
    updates, a reload with the caller's iterator, loaders with iterators of their own) is judged
    tensor by tensor, so nothing is refused for what it lacks.  The local experts are those the
    loader's expert-parallel weight filter lets through (``local_expert_ids``).
    """
    code = getattr(weights, "gi_code", None)
    frame = getattr(weights, "gi_frame", None)  # an unstarted generator's frame holds its arguments
    if getattr(code, "co_name", None) != "get_all_weights" or frame is None:
        return False, None
    try:
        from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    except Exception:
        return False, None
    loader = frame.f_locals.get("self")
    if not isinstance(loader, BaseModelLoader):
        return False, None
    local = getattr(loader, "local_expert_ids", None)
    return True, frozenset(local) if isinstance(local, (set, frozenset)) else None


#: model -> its Folder, kept across load_weights calls (weight updates split a checkpoint)
_FOLDERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _folder(model: Any, ledger: Ledger) -> Any:
    """The model's Folder, or None where harmonization does not apply."""
    if ledger.family not in (MODELOPT, COMPRESSED):
        return None
    try:
        from .harmonize import Folder

        folder = _FOLDERS.get(model)
        if folder is None or folder.reciprocal != (ledger.family == COMPRESSED):
            folder = Folder(reciprocal=ledger.family == COMPRESSED, num_experts=ledger.num_experts)
            with contextlib.suppress(TypeError):  # not weak-referenceable: state lives for this call only
                _FOLDERS[model] = folder
        return folder
    except Exception as exc:  # never break a load over the fold
        logger.warning("vllm-modelopt-shim: harmonization off (%s: %s)", type(exc).__name__, exc)
        return None


def is_awq(model: Any) -> bool:
    """Whether ``model`` was built from an NVFP4_AWQ checkpoint: its vLLM config's quant config came
    through ``_from_config`` (marked; noted by ``_init``), or config.json's quantization_config says so."""
    if model in _AWQ_MODELS or getattr(getattr(model, "quant_config", None), _AWQ_MARK, False):
        return True
    return awq.is_awq_config(getattr(getattr(model, "config", None), "quantization_config", None))


#: models whose vLLM config's quant config ``_from_config`` made from an NVFP4_AWQ config
_AWQ_MODELS: weakref.WeakSet[Any] = weakref.WeakSet()


def _awq_folder(model: Any, ledger: Ledger) -> Any:
    """An AwqFolder for a whole NVFP4_AWQ checkpoint (ModelOpt's), or None."""
    try:
        if ledger.family != MODELOPT or not ledger.num_experts or not is_awq(model):
            return None
        from .awq import Shapes
        from .awqfold import AwqFolder
    except Exception as exc:  # never break a load over it: verify then refuses every pre_quant_scale
        logger.warning("vllm-modelopt-shim: NVFP4_AWQ folding off (%s: %s)", type(exc).__name__, exc)
        return None
    text = getattr(getattr(model, "config", None), "text_config", None)
    shapes = Shapes.of(lambda key: getattr(text, key, None))
    ledger.awq = True
    return AwqFolder(shapes, ledger.num_experts)


def _report(directory: str | None, ledger: Ledger, problems: list[CheckpointError], harmonized: Any) -> None:
    if not directory:
        return
    try:
        from . import report

        logger.info("vllm-modelopt-shim: report written to %s", report.write(directory, ledger, problems, harmonized))
    except Exception as exc:  # a report must never fail a load
        logger.warning("vllm-modelopt-shim: report not written to %s (%s: %s)", directory, type(exc).__name__, exc)


def _raise(problem: CheckpointError) -> None:
    raise problem


def _log_problem(problem: CheckpointError) -> None:
    logger.warning("vllm-modelopt-shim: %s (VLLM_MODELOPT_SHIM_VERIFY=warn: the load goes on)", problem)


def _summary(ledger: Ledger, mode: str, problems: int, harmonized: Any, full: bool) -> None:
    experts = ledger.complete_experts()
    verified = (
        (f"{experts} experts verified" if full else "each tensor checked") if mode != "off" else "verification off"
    )
    refused = f", {len(ledger.refused)} refused" if ledger.refused else ""
    issues = f", {problems} problem(s) logged" if problems else ""
    log = logger.info if full else logger.debug  # weight updates: no INFO line per call
    log(
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
        log("vllm-modelopt-shim: %s", harmonized)
