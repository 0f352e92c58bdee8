"""A user's own model: what to build (:class:`ModelSpec`), built in one call (:func:`build_model`).

The ecosystem's conventions, in one place for every command and both servers:

* the architecture: a timm name, ``tv:NAME`` for torchvision, or a Python file with a class
  or factory function (TorchServe's ``--model-file``), built with keyword arguments;
  ``num_classes`` gives timm/torchvision models a new head (and is passed to a class as
  ``num_classes=N``);
* the weights: a plain state dict, a training checkpoint holding one (timm / Lightning:
  ``state_dict``, ``model``, ``state_dict_ema``, ``model_ema``; DDP's ``module.`` and a
  LightningModule's attribute prefixes are removed), or a whole pickled module, read only when
  the user allows unpickling (it runs code from the file);
* the class names: TorchServe's ``index_to_name.json`` or Triton's one label per line.

Every failure is a :class:`ModelError` (a ValueError: the CLI exits 2) that says what to fix.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

TORCHVISION_PREFIX = "tv:"
# checkpoint keys holding the state dict, in the order they are preferred (the raw weights before EMA)
CHECKPOINT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
# key prefixes added by the training wrapper, not by the model: DDP/DataParallel, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHOWN = 5  # names listed per kind of mismatch


class ModelError(ValueError):
    """The model, its weights or its labels cannot be used as given (the message says why)."""


@dataclass(frozen=True)
class ModelSpec:
    """What to build: an architecture (``name``, or ``model_file`` + ``model_class``), its weights and labels."""

    name: str | None = None               # timm name or tv:NAME
    model_file: Path | None = None        # Python file defining model_class
    model_class: str | None = None        # class or factory function in model_file
    model_kwargs: dict = field(default_factory=dict)
    num_classes: int | None = None
    weights: Path | None = None           # state dict, checkpoint, or (allow_pickle) a pickled module
    pretrained: bool = False              # splitpack's offline ImageNet weights (splitpack.models.pretrained)
    allow_pickle: bool = False
    labels: Path | None = None            # index_to_name.json or one label per line

    def __post_init__(self):
        custom = self.model_file is not None or self.model_class is not None
        if self.name and custom:
            raise ModelError("give either a model name (--model) or --model-file with --model-class, not both")
        if custom and (self.model_file is None or self.model_class is None):
            raise ModelError("--model-file and --model-class go together: the file and the class (or factory "
                             "function) in it that builds the model")
        if not self.name and not custom:
            raise ModelError("no model: give --model NAME (model_name: a timm name, or tv:NAME) or --model-file "
                             "FILE --model-class NAME (model_file, model_class)")
        if self.pretrained and self.weights is not None:
            raise ModelError("give either --pretrained or --weights FILE, not both")
        if self.pretrained and not self.name:
            raise ModelError("--pretrained loads splitpack's ImageNet weights for named models; give your "
                             "class's weights with --weights FILE")
        for name in ("model_file", "weights", "labels"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if not isinstance(self.model_kwargs, dict):
            raise ModelError(f"model_kwargs: expected a JSON object, got {self.model_kwargs!r}")

    @property
    def title(self) -> str:
        """How the model is named in messages and default archive names: the timm name or the class."""
        return self.name or self.model_class


def build_model(spec: ModelSpec) -> nn.Module:
    """The model ``spec`` describes, with its weights, in eval mode (a :class:`ModelError` says what is wrong)."""
    model = _architecture(spec)
    if spec.pretrained:
        from splitpack.models.pretrained import load_pretrained

        load_pretrained(model, spec.name)
    elif spec.weights is not None:
        search = spec.model_file.resolve().parent if spec.model_file else None
        load_weights(model, read_weights(spec.weights, spec.allow_pickle, search_path=search), spec.weights)
    return model.eval()


def _architecture(spec: ModelSpec) -> nn.Module:
    head = {} if spec.num_classes is None else {"num_classes": spec.num_classes}
    if spec.name is None:
        kwargs = dict(spec.model_kwargs)
        if head and kwargs.get("num_classes", spec.num_classes) != spec.num_classes:
            raise ModelError(f"--num-classes {spec.num_classes} contradicts model_kwargs num_classes="
                             f"{kwargs['num_classes']}")
        return construct(model_factory(spec.model_file, spec.model_class), spec.model_class, {**kwargs, **head})
    kwargs = {**spec.model_kwargs, **head}
    try:
        if spec.name.startswith(TORCHVISION_PREFIX):
            import torchvision

            return torchvision.models.get_model(spec.name[len(TORCHVISION_PREFIX):], weights=None, **kwargs)
        import timm

        return timm.create_model(spec.name, pretrained=False, **kwargs)
    except (RuntimeError, ValueError, TypeError, KeyError) as err:  # unknown name, bad keyword
        raise ModelError(f"cannot build {spec.name!r}{_kwargs_text(kwargs)}: {type(err).__name__}: {err}") from None


def _kwargs_text(kwargs: dict) -> str:
    return f" with {json.dumps(kwargs)}" if kwargs else ""


# --- the user's Python file ---------------------------------------------------------------------------

def import_model_file(path: str | Path) -> ModuleType:
    """Import ``path`` as a module of its own (named after its content, so a changed file is imported anew)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    source = path.read_bytes()
    module_name = f"splitpack_user_model_{hashlib.sha256(source).hexdigest()[:16]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        loader_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 -- whatever the file raises, the user's file is at fault
        del sys.modules[module_name]
        raise ModelError(f"model file {path} cannot be imported: {type(err).__name__}: {err}") from None
    return module


def model_factory(path: str | Path, name: str):
    """The class or function ``name`` of the model file ``path``."""
    module = import_model_file(path)
    factory = getattr(module, name, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items() if _builds_models(v, module))
        raise ModelError(f"model file {path} has no class or function {name!r}; it defines "
                         f"{', '.join(found) or 'no nn.Module class or function'}")
    return factory


def _builds_models(value: Any, module: ModuleType) -> bool:
    if inspect.isclass(value):
        return issubclass(value, nn.Module) and value.__module__ == module.__name__
    return inspect.isfunction(value) and value.__module__ == module.__name__


def construct(factory, name: str, kwargs: dict) -> nn.Module:
    """``factory(**kwargs)``, which must give an nn.Module."""
    try:
        model = factory(**kwargs)
    except Exception as err:  # noqa: BLE001 -- bad kwargs (TypeError) or the constructor's own failure
        raise ModelError(f"cannot build {name}{_kwargs_text(kwargs)}: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{name}{_kwargs_text(kwargs)} returned a {type(model).__name__}, not a torch nn.Module")
    return model


# --- weights ----------------------------------------------------------------------------------------

def read_weights(path: str | Path, allow_pickle: bool = False, search_path: Path | None = None
                 ) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a plain state dict, a checkpoint holding one, or (``allow_pickle``) a
    pickled module; ``search_path`` is importable while unpickling (the model file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_pickle:
            reason = str(err).strip().splitlines()[0]
            raise ModelError(f"weights file {path} is not a plain state dict or checkpoint ({reason}); if it is "
                             "a whole pickled model you trust, pass --allow-pickle (unpickling runs code from "
                             "the file)") from None
        content = _unpickle(path, search_path)
    except Exception as err:  # noqa: BLE001 -- not a torch file at all, truncated, ...
        raise ModelError(f"weights file {path} cannot be read: {type(err).__name__}: {err}") from None
    return state_dict_of(content, path)


def _unpickle(path: Path, search_path: Path | None):
    with _importable(search_path):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 -- e.g. its class is not importable here
            raise ModelError(f"weights file {path} cannot be unpickled: {type(err).__name__}: {err} (the "
                             "pickled model's class must be importable: from --model-file's folder or an "
                             "installed package)") from None


@contextlib.contextmanager
def _importable(folder: Path | None):
    if folder is None:
        yield
        return
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))


def state_dict_of(content: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside what ``torch.load`` read: itself, a module's, or a checkpoint's (:data:`CHECKPOINT_KEYS`)."""
    if isinstance(content, nn.Module):
        return content.state_dict()
    if isinstance(content, dict):
        for key in CHECKPOINT_KEYS:
            inner = content.get(key)
            if isinstance(inner, nn.Module):
                return inner.state_dict()
            if isinstance(inner, dict) and inner:
                content = inner
                break
    if isinstance(content, dict) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
        return content
    keys = ", ".join(map(str, list(content)[:SHOWN])) if isinstance(content, dict) else type(content).__name__
    raise ModelError(f"weights file {path} holds no state dict (found {keys}); expected a state dict or a "
                     f"checkpoint with one of the keys {', '.join(CHECKPOINT_KEYS)}")


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _candidates(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The state dict without wrapper prefixes, and also without a prefix every key shares
    (a LightningModule's ``model.`` or ``net.``)."""
    for prefix in WRAPPER_PREFIXES:
        while any(k.startswith(prefix) for k in state):
            state = _strip(state, prefix)
    candidates = [state]
    firsts = {k.split(".", 1)[0] for k in state}
    if len(firsts) == 1 and all("." in k for k in state):
        candidates.append(_strip(state, firsts.pop() + "."))
    return candidates


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path = "weights") -> nn.Module:
    """Load ``state`` into ``model`` strictly; a :class:`ModelError` lists the missing and unexpected keys
    and the mismatched shapes (a few of each) when they do not fit."""
    target = model.state_dict()
    state = max(_candidates(state), key=lambda c: len(target.keys() & c.keys()))
    missing = sorted(target.keys() - state.keys())
    unexpected = sorted(state.keys() - target.keys())
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
              for k, v in state.items() if k in target and v.shape != target[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(items)} {what} ({_few(items)})" for what, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("mismatched shapes", shapes)) if items]
        hint = " (another architecture or num_classes?)" if shapes or (missing and unexpected) else ""
        raise ModelError(f"weights {source} do not fit the model: {'; '.join(parts)}{hint}")
    model.load_state_dict(state, strict=True)
    return model


def _few(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (f", ... {len(items) - SHOWN} more" if len(items) > SHOWN else "")


# --- classes and labels -------------------------------------------------------------------------------

def head_classes(model: nn.Module) -> int:
    """The classes the model's head outputs (its ``num_classes``, else the width of one forward's output)."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    with torch.inference_mode():
        return int(model(torch.zeros(1, 3, 64, 64)).shape[-1])


def read_labels(path: str | Path) -> list[str]:
    """Class names from a ``.json`` file: TorchServe's ``index_to_name.json`` (``{"0": "cat"}``, values may be
    ``[wnid, name]``) or a list; any other file: one label per line (Triton's label file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":  # (a text file's first label may well start with a bracket)
        return _json_labels(text, path)
    labels = [line.strip() for line in text.rstrip("\r\n").splitlines()]
    empty = [i + 1 for i, label in enumerate(labels) if not label]
    if not labels or empty:
        raise ModelError(f"labels file {path}: expected one label per line; "
                         + (f"line(s) {_few(list(map(str, empty)))} are empty" if empty else "it is empty"))
    return labels


def _json_labels(text: str, path: Path) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelError(f"labels file {path} is not valid JSON: {err}") from None
    if isinstance(data, list):
        return [_label_text(v, i, path) for i, v in enumerate(data)]
    if not isinstance(data, dict) or not data:
        raise ModelError(f"labels file {path}: expected an object of index -> name (index_to_name.json)")
    try:
        by_index = {int(k): v for k, v in data.items()}
    except ValueError:
        raise ModelError(f"labels file {path}: keys must be class indices 0..N-1, got {_few(sorted(data))}") from None
    if sorted(by_index) != list(range(len(by_index))):
        gaps = sorted(set(range(max(by_index) + 1)) - set(by_index))
        raise ModelError(f"labels file {path}: indices must be 0..{len(by_index) - 1} without gaps "
                         f"(missing {_few(list(map(str, gaps)))})")
    return [_label_text(by_index[i], i, path) for i in range(len(by_index))]


def _label_text(value: Any, index: int, path: Path) -> str:
    if isinstance(value, list) and value:  # TorchServe's ImageNet file: [wnid, name]
        value = value[-1]
    if not isinstance(value, str) or not value.strip():
        raise ModelError(f"labels file {path}: label {index} must be a non-empty string, got {value!r}")
    return value.strip()


def model_labels(model: nn.Module, num_classes: int, labels_file: str | Path | None = None) -> list[str] | None:
    """The class names: the labels file's (its count must equal the head's), else timm's ImageNet names
    when the head has ImageNet's classes, else None (answers carry class indices)."""
    if labels_file is not None:
        labels = read_labels(labels_file)
        if len(labels) != num_classes:
            raise ModelError(f"labels file {labels_file} has {len(labels)} labels but the model's head has "
                             f"{num_classes} classes")
        return labels
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model) or ("imagenet-1k" if num_classes == 1000 else None)
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    if info.num_classes() != num_classes:
        return None
    return [info.index_to_description(i) for i in range(num_classes)]
