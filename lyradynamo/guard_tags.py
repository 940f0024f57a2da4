"""Guards checked by dict version tags, further than torch takes them (lyra compilations only).

Dynamo checks its guards before every call of a compiled frame: under CUDA graphs that host time
sits on the critical path of each denoising step wherever the scheduler syncs (SD's PNDM).
torch's recursive dict tags (`use_recursive_dict_tags_for_guards`, turned on by the shape policy)
let a submodule be checked by the version tags of its dicts instead of guard by guard, but only
where every guarded object below it is an `nn.Module`, a dict, a tensor, a constant or a function.
Two things stop that in every diffusers attention model, so each `Attention` module and all of
its parents up to the model stay on full guard evaluation (SD1.5: 410 of 5451 guard managers,
about half of Dynamo's time per call):

  * the attention processor is a plain object (`AttnProcessor2_0`), and its call is guarded
    through its class (`type(processor).__call__`: an attribute read off the class);
  * `Transformer2DModel` and the UNet are also read through `module.__dict__` (diffusers'
    config access), an accessor torch's rule for modules does not list.

For a compilation of a lyra frame, `install()` wraps torch's search for tag-safe nodes so that,
before torch's own rules run, these are marked tag safe when everything below them is:

  * a plain object (not a container, type or tensor; a normal instance `__dict__`, no custom
    `__getattribute__`) whose guards go only through its `__dict__` and its class, as torch
    allows for modules;
  * a module or such object also read through `__dict__`, when `__dict__` is the standard
    instance-dict descriptor (the same dict torch already follows);
  * a class reached from such an object whose guards read attributes defined in the class's own
    dict (`__call__`): the class's dict is then added to the guard tree, so its version tag is
    recorded and a method rebound on the class is seen.

What the tags then skip is what they skip for modules: rebinding an attribute, a processor, a
method on the class, or a submodule changes a recorded dict's tag, and that call runs the full
guards (and recompiles where needed). Like torch's rule, it does not see `obj.__class__`
reassigned in place. `lyradynamo.config.extended_dict_tags = False` leaves torch's rules alone.
If torch's guard API differs from what this expects, it logs once and leaves torch's result.
"""
from __future__ import annotations

import gc
import logging
import types
from typing import Any, Iterator, Optional

import torch

log = logging.getLogger("lyradynamo")

_MAX_ROUNDS = 16  # torch's pass and ours alternate up the tree: one round per level they hand over
_installed = False
_original = None  # torch's GuardManagerWrapper.find_tag_safe_roots
_warned = False
last_marked = 0  # nodes marked by the last lyra compilation (tests, dump)


def install() -> None:
    """Wrap torch's tag-safe search (idempotent; nothing happens where torch lacks it)."""
    global _installed, _original
    if _installed:
        return
    try:
        from torch._dynamo.guards import GuardManagerWrapper
    except ImportError:
        return
    original = getattr(GuardManagerWrapper, "find_tag_safe_roots", None)
    if original is None:
        return
    _original = original

    def find_tag_safe_roots(self) -> None:  # noqa: ANN001 - torch's method
        if _enabled():
            _extend(self.root)
        return original(self)

    find_tag_safe_roots.__wrapped__ = original  # type: ignore[attr-defined]
    GuardManagerWrapper.find_tag_safe_roots = find_tag_safe_roots
    _installed = True


def _enabled() -> bool:
    from . import config, shape_policy

    return bool(shape_policy._active) and config.extended_dict_tags


def _extend(root) -> None:  # noqa: ANN001
    global _warned, last_marked
    try:
        last_marked = premark(root)
    except Exception as exc:  # noqa: BLE001 - torch's guard API moved: keep torch's own result
        last_marked = 0
        if not _warned:
            _warned = True
            log.warning("lyradynamo: extended dict-tag guards off (torch's guard API differs: %s); "
                        "Dynamo checks attention processors guard by guard", str(exc)[:200])


def premark(root) -> int:  # noqa: ANN001
    """Mark the nodes of `root`'s tree that the rules above allow, before torch's pass runs.

    Which nodes qualify depends on torch's verdict for everything below them, so the search runs
    on a copy of the tree: torch's pass and this module's rules alternate on the copy until
    neither marks anything new; then the chosen nodes are marked in the real tree (torch's pass
    runs on it next, once, and picks the roots, so no root ends up inside another)."""
    copy = root.clone_manager(lambda _mgr: True)
    shadow = types.SimpleNamespace(root=copy)
    chosen: dict[tuple, Any] = {}
    pending = None  # nodes not yet tag safe (tag safety only grows: later rounds look at these)
    for _ in range(_MAX_ROUNDS):
        _original(shadow)
        if pending is None:
            pending = [(path, node, cls) for path, node, cls in _walk(copy) if not node.is_tag_safe()]
        pending = [item for item in pending if not item[1].is_tag_safe()]
        new = {path: how for path, node, cls in pending if (how := _qualifies(node, cls)) is not None}
        if not new:
            break
        for path, node, _ in pending:
            if path in new:
                node.mark_tag_safe()
        chosen.update(new)
    for path, cls in chosen.items():
        node = _at(root, path)
        if node.get_source() != _at(copy, path).get_source():
            raise RuntimeError(f"guard tree copy differs at {node.get_source()}")
        if cls is not _OBJECT:
            _record_class_dict(node, cls)
    for path in chosen:  # after every class dict is added: a failure above marks nothing
        _at(root, path).mark_tag_safe()
    return len(chosen)


_OBJECT = object()  # _qualifies' answer for an object node (a class node answers its class)


def _children(node) -> list:  # noqa: ANN001
    """(path step, child, accessor or None) for the accessor children and a dict manager's keys
    and values."""
    out = [(("a", i), child, acc)
           for i, (acc, child) in enumerate(zip(node.get_accessors(), node.get_child_managers()))]
    kv = getattr(node, "get_key_value_managers", None)
    if kv is not None:
        for idx, (key_mgr, val_mgr) in sorted(kv().items()):
            if key_mgr is not None:
                out.append((("k", idx), key_mgr, None))
            if val_mgr is not None:
                out.append((("v", idx), val_mgr, None))
    return out


def _walk(root) -> Iterator[tuple]:  # noqa: ANN001
    """(path, node, the class it guards or None) for every node; a class is known for a node
    reached as type(obj), obj.__class__, or an entry of a known class's __mro__."""
    from torch._C._dynamo import guards as G

    stack = [((), root, None)]
    while stack:
        path, node, known = stack.pop()
        yield path, node, (known if isinstance(known, type) else None)
        value_type = node.get_type_of_guarded_value()
        for step, child, acc in _children(node):
            child_known = None
            if isinstance(acc, G.TypeGuardAccessor) or (
                    isinstance(acc, G.GetAttrGuardAccessor) and acc.get_attr_name() == "__class__"):
                child_known = value_type if value_type is not type else None
            elif isinstance(acc, G.TypeMROGuardAccessor) and isinstance(known, type):
                child_known = ("mro", known)
            elif isinstance(acc, G.TupleGetItemGuardAccessor) and isinstance(known, tuple):
                index = _tuple_index(acc)
                mro = known[1].__mro__
                child_known = mro[index] if index is not None and 0 <= index < len(mro) else None
            stack.append((path + (step,), child, child_known))


def _tuple_index(accessor) -> Optional[int]:  # noqa: ANN001
    """The index a TupleGetItemGuardAccessor reads (torch shows it only in its repr)."""
    import re

    match = re.fullmatch(r"TupleGetItemGuardAccessor\((\d+)\)", accessor.repr())
    return int(match.group(1)) if match else None


def _at(root, path: tuple):  # noqa: ANN001, ANN202
    node = root
    for kind, i in path:
        if kind == "a":
            node = node.get_child_managers()[i]
        else:
            key_mgr, val_mgr = node.get_key_value_managers()[i]
            node = key_mgr if kind == "k" else val_mgr
    return node


def _qualifies(node, cls: Optional[type]) -> Optional[Any]:  # noqa: ANN001
    """_OBJECT or the class for a node the rules above allow; None otherwise (also for a node
    already tag safe, or one with a child that is not). `cls`: the class a class node guards."""
    from torch._C._dynamo import guards as G

    if node.is_tag_safe() or hasattr(node, "get_key_value_managers"):
        return None
    if not all(child.is_tag_safe() for _, child, _ in _children(node)):
        return None
    value_type = node.get_type_of_guarded_value()
    accessors = node.get_accessors()
    if value_type is type:  # a class: its own attributes, read through its dict's tag
        if cls is None or type(cls) is not type:
            return None
        for acc in accessors:
            if isinstance(acc, (G.TypeDictGuardAccessor, G.TypeMROGuardAccessor)):
                continue
            if isinstance(acc, G.GetAttrGuardAccessor) and _own_class_attr(cls, acc.get_attr_name()):
                continue
            return None
        return cls
    if value_type is property:  # fget / fset / fdel of a property cannot be rebound
        ok = all(isinstance(acc, G.GetAttrGuardAccessor) and acc.get_attr_name() in ("fget", "fset", "fdel")
                 for acc in accessors)
        return _OBJECT if ok else None
    if not (issubclass(value_type, torch.nn.Module) or _plain_class(value_type)):
        return None
    reads_dict = any(isinstance(acc, G.GetGenericDictGuardAccessor) for acc in accessors)
    reads_class = any(isinstance(acc, G.TypeGuardAccessor) for acc in accessors)
    for acc in accessors:
        if isinstance(acc, (G.GetGenericDictGuardAccessor, G.TypeGuardAccessor)):
            continue
        if isinstance(acc, G.GetAttrGuardAccessor):
            name = acc.get_attr_name()
            if name == "__dict__" and _standard_instance_dict(value_type):
                continue
            # a plain object's attribute: its instance dict and its class's dict are both recorded
            if (reads_dict and reads_class and _plain_class(value_type)
                    and _instance_attr(value_type, name)):
                continue
        return None
    return _OBJECT


_NOT_PLAIN = (dict, list, tuple, set, frozenset, str, bytes, bytearray, type, torch.Tensor,
              types.ModuleType, types.FunctionType, types.MethodType, BaseException)


def _plain_class(cls: type) -> bool:
    """Instances keep their state in a normal `__dict__` and are read the normal way."""
    return (isinstance(cls, type) and cls.__module__ != "builtins" and not issubclass(cls, _NOT_PLAIN)
            and cls.__getattribute__ is object.__getattribute__ and _standard_instance_dict(cls))


def _standard_instance_dict(cls: type) -> bool:
    """`obj.__dict__` is the instance dict (CPython's own descriptor, not a property)."""
    for klass in cls.__mro__:
        if "__dict__" in klass.__dict__:
            return type(klass.__dict__["__dict__"]).__name__ == "getset_descriptor"
    return False


def _instance_attr(cls: type, name: str) -> bool:
    """`obj.<name>` comes from obj's own dict or else cls's own dict: no class of the MRO but cls
    itself defines it, and not as a data descriptor (a property runs code of its own)."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            attr = klass.__dict__[name]
            if klass is not cls or hasattr(type(attr), "__set__") or hasattr(type(attr), "__delete__"):
                return False
    return True


def _own_class_attr(cls: type, name: str) -> bool:
    """`cls.<name>` is the entry of cls's own dict: defined there, and not overridden by a data
    descriptor of the metaclass (`type`'s `__doc__`, `__dict__`, ...)."""
    if name not in cls.__dict__:
        return False
    meta_attr = type.__dict__.get(name)
    return meta_attr is None or not hasattr(type(meta_attr), "__set__")


def _record_class_dict(node, cls: type) -> None:  # noqa: ANN001
    """Add cls's own dict below its class node, so the tags record it (a method rebound on the
    class changes it). The dict behind the class's mappingproxy is the one CPython updates."""
    from torch._C._dynamo import guards as G
    from torch._dynamo.guards import GuardManagerType

    if any(isinstance(acc, G.TypeDictGuardAccessor) for acc in node.get_accessors()):
        return  # Dynamo guards the class's dict already
    (real,) = [d for d in gc.get_referents(cls.__dict__) if isinstance(d, dict)]
    child = node.type_dict_manager(source=f"{node.get_source()}.__dict__", example_value=real,
                                   guard_manager_enum=GuardManagerType.GUARD_MANAGER)
    child.mark_tag_safe()
