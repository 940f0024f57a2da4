"""Guards checked by dict version tags, further than torch takes them (lyra compilations only).

Dynamo checks its guards before every call of a compiled frame: under CUDA graphs that host time
sits on the critical path of each denoising step wherever the scheduler syncs (SD's PNDM).
torch's recursive dict tags (`use_recursive_dict_tags_for_guards`, turned on by the shape policy)
let a submodule be checked by the version tags of its dicts instead of guard by guard, but only
where every guarded object below it is an `nn.Module` read through its `__dict__`, a dict, a
tensor, a constant or a function. In diffusers models that stops at:

  * the attention processor, a plain object (`AttnProcessor2_0`) whose call is read off its class
    (`type(processor).__call__`);
  * modules also read through `module.__dict__` (`Transformer2DModel`, the UNet: config access);
  * attributes read off a module's class (torch 2.11: `ModuleList.__iter__`, `call_super_init`).

So every `Attention` module and all of its parents stay on full guard evaluation (full-size
SD1.5: ~400-500 of ~5500 guard managers; most of Dynamo's time per call). For a compilation of a
lyra frame, `install()` wraps torch's search for tag-safe nodes so that, before torch's own rules
run, these nodes are marked tag safe when everything below them is:

  * a module or a plain object (not a container, type or tensor; a normal instance `__dict__`;
    no custom `__getattribute__`) read through its `__dict__` (the standard descriptor), its class
    (`type(obj)` or `obj.__class__`), and attributes that its instance dict or its class's MRO
    answers without running code (no data descriptor, e.g. no property);
  * a class whose attributes read are plain entries of its MRO's dicts (not data descriptors,
    nor `type`'s own: `__doc__`, `__dict__`, ...);
  * a property (its fget / fset / fdel cannot be rebound).

Wherever an attribute is read off a class, the dicts of the class's whole MRO (builtins left out)
are added to the guard tree, so their version tags are recorded too. What the tags then skip is
what they skip for modules: rebinding or adding an attribute on the object, a processor, a method
or class attribute anywhere in the MRO, or a submodule changes a recorded dict's tag, and that
call runs the full guards (and recompiles where needed). Like torch's rules it does not see a
function's `__code__` replaced in place (`assume_dunder_attributes_remain_unchanged`) or
`obj.__class__` reassigned. `lyradynamo.config.extended_dict_tags = False` leaves torch's rules
alone. Which nodes qualify depends on torch's verdict below them, so the search runs on a copy of
the tree first (`premark`). If torch's guard API differs from what this expects, it logs once
and leaves torch's result.
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
last_marked = 0  # nodes marked by the last lyra compilation (tests, host_overhead's rows)


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
    added = []
    for path, what in chosen.items():
        node = _at(root, path)
        if node.get_source() != _at(copy, path).get_source():
            raise RuntimeError(f"guard tree copy differs at {node.get_source()}")
        if what is not _NOTHING:
            added += _record_mro_dicts(node, what)
    for mgr in added:  # after every dict is added: a failure above marks nothing
        mgr.mark_tag_safe()
    for path in chosen:
        _at(root, path).mark_tag_safe()
    return len(chosen)


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
    """What marking `node` needs, for a node the rules above allow: _NOTHING, or
    ("class", C) / ("object", C): the dicts of C's MRO must be added to the tree (attributes read
    off a class, or off an object's class). None for a node that does not qualify, is already
    tag safe, or has a child that is not. `cls`: the class a class node guards, if known."""
    from torch._C._dynamo import guards as G

    if node.is_tag_safe() or hasattr(node, "get_key_value_managers"):
        return None
    if not all(child.is_tag_safe() for _, child, _ in _children(node)):
        return None
    value_type = node.get_type_of_guarded_value()
    accessors = node.get_accessors()
    if value_type is type:  # a class: attributes read off it depend on its MRO's dicts
        if cls is None or type(cls) is not type:
            return None
        for acc in accessors:
            if isinstance(acc, (G.TypeDictGuardAccessor, G.TypeMROGuardAccessor)):
                continue
            name = acc.get_attr_name() if isinstance(acc, G.GetAttrGuardAccessor) else None
            if name is not None and _class_attr(cls, name) and not _is_data_descriptor_of_type(name):
                continue
            return None
        return ("class", cls)
    if value_type is property:  # fget / fset / fdel of a property cannot be rebound
        ok = all(isinstance(acc, G.GetAttrGuardAccessor) and acc.get_attr_name() in ("fget", "fset", "fdel")
                 for acc in accessors)
        return _NOTHING if ok else None
    if not (issubclass(value_type, torch.nn.Module) or _plain_class(value_type)):
        return None
    if value_type.__getattribute__ is not object.__getattribute__:
        return None
    reads_dict = any(isinstance(acc, G.GetGenericDictGuardAccessor) for acc in accessors)
    needs_mro = False
    for acc in accessors:
        if isinstance(acc, (G.GetGenericDictGuardAccessor, G.TypeGuardAccessor)):
            continue
        if isinstance(acc, G.GetAttrGuardAccessor):
            name = acc.get_attr_name()
            if name == "__dict__" and _standard_instance_dict(value_type):
                continue
            if name == "__class__":  # type(obj), as the type accessor reads it
                continue
            # obj.<name> through the instance dict (recorded) and the class's MRO (recorded below)
            if reads_dict and _class_attr(value_type, name, or_instance=_plain_class(value_type)):
                needs_mro = True
                continue
        return None
    return ("object", value_type) if needs_mro else _NOTHING


_NOTHING = ("nothing", None)
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


def _class_attr(cls: type, name: str, or_instance: bool = False) -> bool:
    """`<cls or its instance>.<name>` is a plain entry of a dict of cls's MRO: the first class
    that defines it does not make it a data descriptor (a property runs code of its own), and
    for a class, `type` has no data descriptor of that name (`__doc__`, `__dict__`, ...).
    `or_instance`: a name no class defines is an instance attribute (in the instance dict)."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return not _is_data_descriptor(klass.__dict__[name])
    return or_instance


def _is_data_descriptor(attr) -> bool:  # noqa: ANN001
    """A data descriptor (a property, a getset): reading it runs code, not a dict lookup."""
    return hasattr(type(attr), "__set__") or hasattr(type(attr), "__delete__")


def _is_data_descriptor_of_type(name: str) -> bool:
    return name in type.__dict__ and _is_data_descriptor(type.__dict__[name])


def _real_dict(cls: type) -> dict:
    """The dict behind cls's mappingproxy: the one CPython updates (and versions)."""
    (real,) = [d for d in gc.get_referents(cls.__dict__) if isinstance(d, dict)]
    return real


def _record_mro_dicts(node, what) -> list:  # noqa: ANN001
    """Add the dicts of the MRO of `what`'s class below `node` (the class's node, or for an
    object, its type(obj) node, added if missing), so that their version tags are recorded:
    rebinding or adding an attribute on any class of the MRO is then seen. Builtin classes are
    left out (their dicts cannot change). Returns the managers it added or reused."""
    from torch._C._dynamo import guards as G
    from torch._dynamo.guards import GuardManagerType

    kind, cls = what
    enum = GuardManagerType.GUARD_MANAGER
    made = []
    if kind == "object":
        node = node.type_manager(source=f"type({node.get_source()})", example_value=cls,
                                 guard_manager_enum=enum)
        made.append(node)
    src = node.get_source()
    if not any(isinstance(acc, G.TypeDictGuardAccessor) for acc in node.get_accessors()):
        made.append(node.type_dict_manager(source=f"{src}.__dict__", example_value=_real_dict(cls),
                                           guard_manager_enum=enum))
    bases = [(i, klass) for i, klass in enumerate(cls.__mro__) if i and klass.__module__ != "builtins"]
    if bases:
        mro = node.type_mro_manager(source=f"{src}.__mro__", example_value=cls.__mro__, guard_manager_enum=enum)
        made.append(mro)
        for i, klass in bases:
            item = mro.tuple_getitem_manager(i, f"{src}.__mro__[{i}]", klass, enum)
            made.append(item)
            made.append(item.type_dict_manager(source=f"{src}.__mro__[{i}].__dict__",
                                               example_value=_real_dict(klass), guard_manager_enum=enum))
    return made
