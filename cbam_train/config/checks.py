"""The checks every validator shares: one ConfigError naming the key, what it got and what is allowed."""

from __future__ import annotations

from typing import Any, Collection

from cbam_train.config.errors import ConfigError


def choice(key: str, value: Any, allowed: Collection[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: unknown value {value!r}; choose one of: {', '.join(map(str, allowed))}")


def positive(key: str, value: float, strict: bool = True) -> None:
    if (value <= 0) if strict else (value < 0):
        raise ConfigError(f"{key} must be {'> 0' if strict else '>= 0'}, got {value}")


def in_range(key: str, value: float, low: float, high: float, open_high: bool = False) -> None:
    if not (low <= value < high if open_high else low <= value <= high):
        raise ConfigError(f"{key} must be in [{low:g}, {high:g}{')' if open_high else ']'}, got {value}")
