"""Model checkpoints the user does not trust: read as tensors only, never as arbitrary pickled objects.

``load_state_dict`` reads ``.safetensors`` files with safetensors and everything else with
``torch.load(..., weights_only=True)``, whose unpickler only builds tensors and plain containers; a pickle that
asks for anything else is refused, and is never retried with ``weights_only=False``. ``save_checkpoint`` writes
both formats atomically.
"""
from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .errors import CheckpointError
from .fileio import atomic_write

# Keys under which training scripts commonly nest the model's tensors, tried in this order.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
# Prefixes added by wrappers (DataParallel / DistributedDataParallel, torch.compile), stripped when every key
# carries them.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
ACCEPTED = "only tensors / state_dicts saved with torch.save, or .safetensors files, are accepted"
SHOWN = 5  # names listed per category in mismatch messages


def _is_safetensors(path: str) -> bool:
    if path.lower().endswith(".safetensors"):
        return True
    # a safetensors file starts with an 8-byte little-endian header length, then the JSON header '{'
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    line = text[0].strip() if text else ""
    if not line:
        return "unexpected end of file" if isinstance(exc, EOFError) else type(exc).__name__
    if len(line) > limit and ". " in line:
        line = line.split(". ", 1)[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _refusal(path: str, exc: pickle.UnpicklingError) -> CheckpointError:
    text = str(exc)
    marker = "Unsupported global: GLOBAL "
    if marker in text:
        wanted = text.split(marker, 1)[1].split()[0]
        why = (f"loading it would run code or construct arbitrary Python objects (it asks for {wanted}), "
               "which the safe weights-only loader does not allow")
    else:
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail = next((d.strip() for d in detail if d.strip()), "unreadable pickle")
        why = (f"the safe weights-only loader cannot read it ({detail}): it is corrupt, or loading it would run "
               "code or construct arbitrary Python objects")
    return CheckpointError(f"checkpoint {path} was refused: {why}; {ACCEPTED} (if you trust its origin, "
                           "re-export it as model.state_dict() or .safetensors)")


def _read(path: str):
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a file (give the .pt/.pth/.safetensors "
                              "file inside it)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if _is_safetensors(path):
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors is a dependency
            raise CheckpointError(f"checkpoint {path} is a .safetensors file but the safetensors package is "
                                  "not installed (pip install safetensors)") from exc
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, Exception) as exc:
            raise CheckpointError(f"checkpoint {path} is not a readable .safetensors file (truncated or "
                                  f"corrupt: {_first_line(exc)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None
    except Exception as exc:  # zip, EOF and stray-byte errors of a truncated or corrupt file
        kind = "" if isinstance(exc, (RuntimeError, EOFError)) else f"{type(exc).__name__} "
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint (empty, truncated or "
                              f"corrupt: {kind}{_first_line(exc)})") from None


def _tensor_items(obj) -> "OrderedDict[str, Tensor]":
    if not isinstance(obj, Mapping):
        return OrderedDict()
    return OrderedDict((k, v) for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor))


def _unwrap(obj, path: str, depth: int = 0) -> "OrderedDict[str, Tensor]":
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and depth < 3:
                found = _unwrap(inner, path, depth + 1)
                if found:
                    return found
        tensors = _tensor_items(obj)
        if tensors:
            return tensors
        # a single nested dict of tensors under another name ({"weights": {...}, "epoch": 3})
        nested = [k for k, v in obj.items() if isinstance(v, Mapping) and _tensor_items(v)]
        if len(nested) == 1 and depth < 3:
            return _unwrap(obj[nested[0]], path, depth + 1)
        if len(nested) > 1:
            raise CheckpointError(f"checkpoint {path} holds several state_dicts ({', '.join(map(str, nested))}) "
                                  f"and none under {'/'.join(CONTAINER_KEYS)}; save the one to use on its own")
    return OrderedDict()


def _strip_prefixes(sd: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
    changed = True
    while changed and sd:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = OrderedDict((k[len(prefix):], v) for k, v in sd.items())
                changed = True
    return sd


def load_state_dict(path: Union[str, os.PathLike]) -> Dict[str, Tensor]:
    """The tensors of an untrusted checkpoint as a ``{name: tensor}`` dict on the CPU.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``.
    A state_dict nested under ``state_dict``/``model_state_dict``/``model``/``net``/``module`` is unwrapped,
    non-tensor entries (epoch, ...) are dropped and a ``module.`` prefix shared by every key is stripped.
    Raises CheckpointError (one line naming the file) when the file is missing, a directory, empty, corrupt,
    holds no tensors, or is a pickle that would need code to load.
    """
    path = os.fspath(path)
    obj = _read(path)
    if isinstance(obj, Tensor):
        raise CheckpointError(f"checkpoint {path} holds a single tensor, not a state_dict of named tensors")
    sd = _unwrap(obj, path)
    if not sd:
        keys = ""
        if isinstance(obj, Mapping) and obj:
            names = [repr(k) for k in list(obj)[:8]]
            keys = f" (top-level keys: {', '.join(names)}{', ...' if len(obj) > 8 else ''})"
        raise CheckpointError(f"checkpoint {path} holds no tensors{keys}")
    sd = _strip_prefixes(sd)
    return {k: (v.detach() if isinstance(v, nn.Parameter) else v) for k, v in sd.items()}


def checkpoint_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The string metadata of a .safetensors checkpoint's header ({} for other formats or none)."""
    path = os.fspath(path)
    if not os.path.isfile(path) or not _is_safetensors(path):
        return {}
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # an unreadable file is reported by load_state_dict
        return {}


def _listing(names: List[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else "")


def apply_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: Optional[str] = None) -> None:
    """Load ``state_dict`` into ``model`` strictly; raise CheckpointError listing the missing keys, the
    unexpected keys and the shape mismatches (the first few of each, with counts) when it does not fit.

    Only ``num_batches_tracked`` buffers may be absent (older checkpoints and safetensors exports often lack
    them; torch itself tolerates that): the model's own counters are kept."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} (checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)})"
                  for k, v in expected.items() if k in state_dict and isinstance(state_dict[k], Tensor)
                  and tuple(state_dict[k].shape) != tuple(v.shape)]
    not_tensors = [k for k in state_dict if k in expected and not isinstance(state_dict[k], Tensor)]
    if missing or unexpected or mismatched or not_tensors:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key{'s' * (len(missing) != 1)}: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) != 1)}: "
                         f"{_listing(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch{'es' * (len(mismatched) != 1)}: "
                         f"{_listing(mismatched)}")
        if not_tensors:
            parts.append(f"{len(not_tensors)} non-tensor value{'s' * (len(not_tensors) != 1)}: "
                         f"{_listing(not_tensors)}")
        where = f"checkpoint {source}" if source else "the checkpoint"
        raise CheckpointError(f"{where} does not fit the model ({type(model).__name__}): " + "; ".join(parts))
    filled = dict(state_dict)
    for k, v in expected.items():
        if k not in filled:  # a num_batches_tracked buffer: keep the model's
            filled[k] = v
    try:
        model.load_state_dict(filled, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        where = f"checkpoint {source}" if source else "the checkpoint"
        raise CheckpointError(f"{where} could not be loaded into the model: {_first_line(exc)}") from None


def _plain_tensors(state: Union[nn.Module, Mapping[str, Tensor]]) -> "OrderedDict[str, Tensor]":
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, Mapping):
        raise CheckpointError(f"save_checkpoint needs a model or a state_dict, got {type(state).__name__}")
    out = OrderedDict()
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise CheckpointError(f"save_checkpoint needs str -> tensor entries; {k!r} holds "
                                  f"{type(v).__name__}")
        out[k] = v.detach().to("cpu")
    if not out:
        raise CheckpointError("save_checkpoint was given no tensors")
    # safetensors refuses tensors sharing storage (tied weights, views): give each its own compact copy
    owners: Dict[Tuple[int, int], int] = {}
    for v in out.values():
        key = (v.untyped_storage().data_ptr(), v.device.index or 0)
        owners[key] = owners.get(key, 0) + 1
    for k, v in out.items():
        storage = v.untyped_storage()
        whole = v.is_contiguous() and v.storage_offset() == 0 and v.numel() * v.element_size() == storage.nbytes()
        if owners[(storage.data_ptr(), v.device.index or 0)] > 1 or not whole:
            out[k] = v.clone(memory_format=torch.contiguous_format)
    return out


def _stem(stem: Union[str, os.PathLike]) -> str:
    stem = os.fspath(stem)
    for suffix in (".safetensors", ".pth", ".pt"):
        if stem.lower().endswith(suffix):
            return stem[:-len(suffix)]
    return stem


def save_checkpoint(state_dict_or_model: Union[nn.Module, Mapping[str, Tensor]],
                    stem: Union[str, os.PathLike], metadata: Optional[Mapping[str, str]] = None) -> Tuple[str, str]:
    """Write ``stem.safetensors`` and ``stem.pt`` (a plain state_dict via torch.save), each atomically
    (temporary file beside it, fsync, rename). Tensors are moved to the CPU, made contiguous, and tensors
    sharing storage are copied apart. A trailing .pt/.pth/.safetensors on ``stem`` is dropped. ``metadata``
    (strings): stored in the .safetensors header (e.g. the input normalisation,
    :func:`anp_fast.normalization.to_metadata`); the .pt stays a plain state_dict. Returns
    ``(safetensors_path, pt_path)``."""
    from safetensors.torch import save as st_save

    tensors = _plain_tensors(state_dict_or_model)
    base = _stem(stem)
    folder = os.path.dirname(os.path.abspath(base))
    os.makedirs(folder, exist_ok=True)
    st_path, pt_path = base + ".safetensors", base + ".pt"
    blob = st_save(dict(tensors), metadata={**{str(k): str(v) for k, v in (metadata or {}).items()},
                                            "format": "pt"})
    atomic_write(st_path, lambda f: f.write(blob), binary=True)
    atomic_write(pt_path, lambda f: torch.save(tensors, f), binary=True)
    return st_path, pt_path


def _numpy_globals():
    """What a torch.save of plain numpy arrays needs (arrays of plain dtypes only: object arrays are refused)."""
    import numpy as np

    from .datasets import _numpy_reconstruct, _plain_dtype

    rec = _numpy_reconstruct()
    kinds = (np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64)
    return [(rec, "numpy.core.multiarray._reconstruct"), (rec, "numpy._core.multiarray._reconstruct"),
            (np.ndarray, "numpy.ndarray"), (_plain_dtype, "numpy.dtype")] + [type(np.dtype(k)) for k in kinds]


TRIGGER_INFO_KEYS = ("trigger_pattern", "trigger_mask", "trigger_alpha")


def load_trigger_info(path: Union[str, os.PathLike]) -> Dict:
    """The published code's ``trigger_info.th`` (a torch.save of a dict of numpy arrays: ``trigger_pattern``,
    ``trigger_mask`` (1, H, W, C) uint8, ``trigger_alpha``, ``poison_target``), read with
    ``torch.load(weights_only=True)`` allowing numpy arrays of plain dtypes and nothing else. Returns the dict
    with the arrays as tensors; CheckpointError (one line) on anything else."""
    import numpy as np

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"trigger file {path} does not exist" if not os.path.exists(path)
                              else f"trigger file {path} is not a file")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(str(_refusal(path, exc)).replace("checkpoint ", "trigger file ", 1).replace(
            "only tensors / state_dicts saved with torch.save, or .safetensors files, are accepted",
            "only numpy arrays, numbers and strings are accepted in a trigger_info file").replace(
            "re-export it as model.state_dict() or .safetensors", "re-save it as a dict of plain numpy arrays")) from None
    except Exception as exc:
        raise CheckpointError(f"trigger file {path} is not readable ({_first_line(exc)})") from None
    if not isinstance(obj, Mapping) or any(k not in obj for k in TRIGGER_INFO_KEYS):
        keys = ", ".join(map(repr, list(obj)[:6])) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"trigger file {path} is not a trigger_info dict (needs {', '.join(TRIGGER_INFO_KEYS)}; "
                              f"found {keys})")
    out = dict(obj)
    for key in ("trigger_pattern", "trigger_mask", "poison_target"):
        if key in out and isinstance(out[key], np.ndarray):
            out[key] = torch.from_numpy(np.ascontiguousarray(out[key]))
    pattern, mask = out["trigger_pattern"], out["trigger_mask"]
    if not (isinstance(pattern, Tensor) and isinstance(mask, Tensor) and pattern.dim() == 4 and mask.dim() == 4
            and pattern.shape[0] == 1 and mask.shape[:3] == pattern.shape[:3]):
        raise CheckpointError(f"trigger file {path}: trigger_pattern/trigger_mask must be (1, H, W, C) arrays of "
                              f"one size (found {tuple(getattr(pattern, 'shape', ()))} and "
                              f"{tuple(getattr(mask, 'shape', ()))})")
    alpha = out["trigger_alpha"]
    if not isinstance(alpha, (int, float)) or not 0 < float(alpha) <= 1:
        raise CheckpointError(f"trigger file {path}: trigger_alpha {alpha!r} must be a number in (0, 1]")
    return out
