"""Variant configs: what to turn each attention site into.

A config is a frozen, validated dataclass that says *what* a site becomes; the
rewrite handler registered for its type (see :mod:`attnopt.kernels`) says *how*.
Configs are versioned and round-trip through JSON so a converted checkpoint can
record exactly what was applied to each site.

A per-layer policy is a mapping from site-name patterns (``fnmatch`` globs, or
compiled regular expressions) to configs; the first pattern that matches a site
wins, and ``None`` as a value leaves matching sites untouched.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, Union

__all__ = [
    "AttentionConfig",
    "Policy",
    "config_from_dict",
    "register_config",
    "resolve_policy",
]

_CONFIGS: dict[str, type[AttentionConfig]] = {}

C = TypeVar("C", bound="type[AttentionConfig]")


def register_config(cls: C) -> C:
    """Class decorator: make a config type known to :func:`config_from_dict`."""
    name = cls.variant
    if name in _CONFIGS and _CONFIGS[name] is not cls:
        raise ValueError(f"a config for variant {name!r} is already registered: {_CONFIGS[name]}")
    _CONFIGS[name] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Base class of every variant config.

    Subclasses are frozen dataclasses that set ``variant`` (a stable name used in
    JSON and reports) and ``version``, and check their fields in ``validate``.
    """

    variant: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a value is out of range."""

    # -- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"variant": self.variant, "version": self.version, **fields}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def describe(self) -> str:
        """Short human-readable form, e.g. ``SlidingWindow(window=256, sinks=4)``."""
        defaults = {
            f.name: f.default
            for f in dataclasses.fields(self)
            if f.default is not dataclasses.MISSING
        }
        parts = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if defaults.get(f.name, dataclasses.MISSING) != getattr(self, f.name)
        ]
        return f"{type(self).__name__}({', '.join(parts)})"


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def config_from_dict(data: Mapping[str, Any]) -> AttentionConfig:
    """Rebuild a config from :meth:`AttentionConfig.to_dict` output."""
    data = dict(data)
    name = data.pop("variant", None)
    version = data.pop("version", None)
    if name not in _CONFIGS:
        raise ValueError(f"unknown attention variant {name!r}; known variants: {sorted(_CONFIGS)}")
    cls = _CONFIGS[name]
    if version is not None and version > cls.version:
        raise ValueError(
            f"config for {name!r} has version {version}, newer than this attnopt supports "
            f"({cls.version}); upgrade attnopt"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for {cls.__name__}; valid: {sorted(names)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


Pattern = Union[str, "re.Pattern[str]"]
Policy = Mapping[Pattern, AttentionConfig | None]


def matches(pattern: Pattern, name: str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.search(name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def resolve_policy(config: AttentionConfig | Policy, name: str) -> AttentionConfig | None:
    """The config that ``config`` (a config or a per-layer policy) assigns to site ``name``."""
    if isinstance(config, AttentionConfig):
        return config
    for pattern, value in config.items():
        if matches(pattern, name):
            return value
    return None


def check_policy(config: Any) -> None:
    """Raise ``TypeError`` unless ``config`` is a config or a policy mapping of configs."""
    if isinstance(config, AttentionConfig):
        return
    if not isinstance(config, Mapping):
        raise TypeError(
            f"config must be an attnopt variant config (e.g. attnopt.SlidingWindow(256)) or a "
            f"mapping of layer-name patterns to configs, got {type(config).__name__}"
        )
    for pattern, value in config.items():
        if not isinstance(pattern, (str, re.Pattern)):
            raise TypeError(
                f"policy keys must be glob strings or compiled regexes, got {pattern!r}"
            )
        if value is not None and not isinstance(value, AttentionConfig):
            raise TypeError(
                f"policy value for {pattern!r} must be a variant config or None, got {value!r}"
            )
