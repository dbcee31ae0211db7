"""Config plumbing shared by every model family.

Every config is a frozen dataclass validated in ``__post_init__``; errors are
:class:`ConfigError` naming the field. ``apply_overrides`` implements the CLI's
``--set section.field=value`` with type checking against the dataclass fields.

A field may be a tagged union of config classes (``A | B``, each with a ``kind: Literal[...]``
field of its own, e.g. ``arjax.nn.linear_attention.MixerConfig``): each class holds only the
fields its kind uses, so setting another kind's field is an unknown-key error naming it;
``--set section.kind=...`` switches the class, keeping the fields both classes have.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def check(condition: bool, field: str, message: str) -> None:
    """Raise ``ConfigError("field: message")`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def _matches(value: Any, annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        inner = args[0] if args else Any
        return isinstance(value, tuple) and all(_matches(v, inner) for v in value)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def tagged_union_members(annotation: Any) -> dict[str, type] | None:
    """``{kind: class}`` if ``annotation`` is a union of dataclasses that each have a
    ``kind: Literal[<one value>]`` field, else None."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    members = {}
    for cls in typing.get_args(annotation):
        hint = typing.get_type_hints(cls).get("kind") if dataclasses.is_dataclass(cls) else None
        if typing.get_origin(hint) is not typing.Literal or len(typing.get_args(hint)) != 1:
            return None
        members[typing.get_args(hint)[0]] = cls
    return members


def switch_kind(cfg: Any, cls: type, **changes: Any) -> Any:
    """A ``cls`` config with the fields ``cfg`` shares with it (except ``kind``), then
    ``changes``."""
    names = {f.name for f in dataclasses.fields(cls)} - {"kind"}
    kept = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in names}
    return cls(**{**kept, **changes})


def check_field_types(cfg: Any) -> None:
    """Every field holds a value of its declared type (ConfigError naming the field)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if typing.get_origin(hint) is typing.Literal:
            expected = f"one of {list(typing.get_args(hint))}"
        else:
            expected = f"of type {hint}"
        check(_matches(value, hint), f.name, f"must be {expected}, got {value!r}")


def check_positive(cfg: Any, *fields: str) -> None:
    for name in fields:
        value = getattr(cfg, name)
        check(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            name,
            f"must be a positive int, got {value!r}",
        )


def _parse_value(text: str, annotation: Any, field: str) -> Any:
    """Parse a CLI string into the type a dataclass field declares."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse_value(text, arg, field)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{field}: cannot parse {text!r} as {annotation}")
    if origin is typing.Literal:
        for arg in args:
            if str(arg) == text:
                return arg
        raise ConfigError(f"{field}: {text!r} is not one of {list(args)}")
    if annotation is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{field}: expected a bool, got {text!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{field}: expected an int, got {text!r}") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{field}: expected a float, got {text!r}") from None
    if annotation is str:
        return text
    if origin is tuple:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = [v for v in text.strip("()[]").split(",") if v.strip()]
        if not isinstance(value, list):
            value = [value]
        inner = args[0] if args else str
        return tuple(_parse_value(str(v).strip(), inner, field) for v in value)
    raise ConfigError(f"{field}: unsupported field type {annotation}")


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...], prefix: str = "") -> Any:
    """Return ``cfg`` with ``["a.b=1", ...]`` applied; nested dataclasses by dotted path.

    Unknown keys and unparsable values raise :class:`ConfigError` naming the key. All
    overrides land before validation, so cross-field checks see the final values; each
    dataclass is then re-validated once by its ``__post_init__``.
    """
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        node = tree
        *path, leaf = key.strip().split(".")
        for name in path:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with another --set of a parent key")
        node[leaf] = text.strip()
    return _apply_tree(cfg, tree, prefix)


def _apply_tree(cfg: Any, tree: dict, prefix: str) -> Any:
    fields = {f.name for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    unknown = [name for name in tree if name not in fields]
    if unknown:
        kind = getattr(cfg, "kind", None)
        owner = f"{type(cfg).__name__} (kind {kind!r})" if isinstance(kind, str) else "section"
        keys = ", ".join(f"{prefix}{name}" for name in unknown)
        plural = len(unknown) > 1
        raise ConfigError(
            f"{keys}: unknown config key{'s' if plural else ''}, not "
            f"{'fields' if plural else 'a field'} of this {owner} "
            f"(known: {', '.join(sorted(fields))})"
        )
    for name, sub in tree.items():
        full = f"{prefix}{name}"
        current = getattr(cfg, name)
        if isinstance(sub, dict):
            if not dataclasses.is_dataclass(current):
                raise ConfigError(f"{full}: is not a section, cannot set {', '.join(sub)}")
            members = tagged_union_members(hints[name])
            if members and isinstance(sub.get("kind"), str):
                kind = _parse_value(sub["kind"], typing.Literal[tuple(members)], f"{full}.kind")
                current = switch_kind(current, members[kind])
                sub = {k: v for k, v in sub.items() if k != "kind"}
            changes[name] = _apply_tree(current, sub, f"{full}.")
        elif dataclasses.is_dataclass(current):
            raise ConfigError(f"{full}: is a section; set one of its fields")
        else:
            changes[name] = _parse_value(sub, hints[name], full)
    try:
        return dataclasses.replace(cfg, **changes)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None


def replace_everywhere(cfg: Any, **fields: Any) -> Any:
    """``cfg`` with ``fields`` set in it and in every config nested in it that has them (HAT:
    encoder, backbone, decoder), e.g. ``scan_layers=False`` or ``dtype="bfloat16"``."""
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in fields:
            changes[f.name] = fields[f.name]
        elif dataclasses.is_dataclass(value):
            changes[f.name] = replace_everywhere(value, **fields)
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg: Any) -> dict:
    """JSON-ready nested dict of a config (for metadata and checkpoints)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def from_dict(cls: type, data: dict) -> Any:
    """Inverse of :func:`to_dict` for nested dataclasses; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{cls.__name__}.{key}: unknown config key")
        hint, members = hints[key], tagged_union_members(hints[key])
        if members and isinstance(value, dict):
            if value.get("kind") not in members:
                raise ConfigError(
                    f"{cls.__name__}.{key}.kind: must be one of {list(members)}, "
                    f"got {value.get('kind')!r}"
                )
            value = from_dict(members[value["kind"]], value)
        elif dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)
