"""Architecture registry for ``--arch NAME``: this package's CIFAR models by name, torchvision classification
models (``tv:NAME`` or a bare name the registry lacks), or any ``package.module:callable`` returning a module.

Models are always built with freshly initialised weights: nothing is ever downloaded (the trained weights come
from the user's checkpoint).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, Dict, List, Optional

import torch.nn as nn

from . import models
from .errors import ModelError

ARCHS: Dict[str, Callable[..., nn.Module]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
    "preact_resnet18": models.preact_resnet18,
    "vgg16_bn": models.vgg16_bn,
    "vgg19_bn": models.vgg19_bn,
    "mobilenetv2": models.mobilenetv2,
    "wrn16": models.wrn16,
}

_TV_PREFIX = "tv:"
_WEIGHT_KWARGS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


def list_archs() -> List[str]:
    """The registry's architecture names (torchvision names and ``module:callable`` are accepted too)."""
    return list(ARCHS)


def _torchvision_names() -> List[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _signature(fn) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C-level callables have none
        return None


def _accepts(sig: Optional[inspect.Signature], name: str, var_keyword: bool) -> bool:
    """Whether ``sig`` names keyword parameter ``name`` (or, with ``var_keyword``, has a ``**kwargs``)."""
    if sig is None:
        return False
    params = sig.parameters.values()
    return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params) or (
        var_keyword and any(p.kind is p.VAR_KEYWORD for p in params))


def _call(fn, label: str, kwargs: dict) -> nn.Module:
    """``fn(**kwargs)`` with argument mistakes and failures turned into one-line ModelErrors."""
    sig = _signature(fn)
    if sig is not None:
        try:
            sig.bind(**kwargs)
        except TypeError as exc:
            raise ModelError(f"cannot build {label} with arguments {sorted(kwargs)}: {exc}") from None
    try:
        model = fn(**kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"building {label} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{label} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _build_torchvision(name: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    if in_channels != 3:
        raise ModelError(f"torchvision model {name!r} takes 3 input channels, not in_channels={in_channels} "
                         "(use a registry architecture or a module:callable for other inputs)")
    for key in _WEIGHT_KWARGS:
        if kwargs.get(key) not in (None, False):
            raise ModelError(f"torchvision model {name!r}: {key}= is not accepted; models are built untrained "
                             "and the weights come from the checkpoint")
    import torchvision

    kwargs = {k: v for k, v in kwargs.items() if k not in _WEIGHT_KWARGS}
    return _call(lambda **kw: torchvision.models.get_model(name, weights=None, **kw), f"torchvision {name!r}",
                 dict(kwargs, num_classes=num_classes))


def _build_callable(spec: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not module_name or not attr:
        raise ModelError(f"--arch {spec!r}: expected package.module:callable")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise ModelError(f"cannot import module {module_name!r} for --arch {spec!r}: "
                         f"{type(exc).__name__}: {exc}") from exc
    fn = module
    for part in attr.split("."):
        try:
            fn = getattr(fn, part)
        except AttributeError:
            raise ModelError(f"module {module_name!r} has no attribute {attr!r} (--arch {spec!r})") from None
    if not callable(fn):
        raise ModelError(f"{spec!r} is a {type(fn).__name__}, not a callable")
    # num_classes goes to a callable naming it or taking **kwargs; in_channels through **kwargs only when it is
    # not the usual 3, since builders such as torchvision's forward **kwargs to a class without that argument.
    sig = _signature(fn)
    call_kwargs = dict(kwargs)
    for key, value, var_keyword in (("num_classes", num_classes, True),
                                    ("in_channels", in_channels, in_channels != 3)):
        if key not in call_kwargs and _accepts(sig, key, var_keyword):
            call_kwargs[key] = value
    return _call(fn, spec, call_kwargs)


def build_arch(name: str, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    """A freshly initialised model for ``name``, resolved in order as:

    1. a registry name (:data:`ARCHS`, see :func:`list_archs`), built with ``num_classes``, ``in_channels`` and
       ``kwargs`` (e.g. ``width=``);
    2. ``tv:NAME`` or a bare torchvision classification model name, built by ``torchvision.models.get_model``
       with ``weights=None`` and ``num_classes`` (3 input channels only);
    3. ``package.module:callable`` (the callable may be dotted, ``module:Class.factory``), called with ``kwargs``
       plus ``num_classes`` when its signature names it or takes ``**kwargs``, and ``in_channels`` when its
       signature names it (or takes ``**kwargs`` and ``in_channels != 3``); it must return an ``nn.Module``.

    Registry and torchvision names are matched case-insensitively. Raises ModelError (one line) otherwise.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"--arch must be a non-empty name, got {name!r}")
    spec = name.strip()
    key = spec.lower()
    if key in ARCHS:
        return _call(ARCHS[key], f"architecture {key!r}",
                     dict(kwargs, num_classes=num_classes, in_channels=in_channels))
    if key.startswith(_TV_PREFIX):
        tv_name = key[len(_TV_PREFIX):].strip()
        if tv_name not in _torchvision_names():
            raise ModelError(f"unknown torchvision classification model {tv_name!r} in --arch {spec!r} "
                             "(see torchvision.models.list_models())")
        return _build_torchvision(tv_name, num_classes, in_channels, kwargs)
    if ":" in spec:
        return _build_callable(spec, num_classes, in_channels, kwargs)
    if key in _torchvision_names():
        return _build_torchvision(key, num_classes, in_channels, kwargs)
    raise ModelError(f"unknown architecture {spec!r}: use one of {', '.join(ARCHS)}, a torchvision classification "
                     "model name (or tv:NAME), or package.module:callable")
