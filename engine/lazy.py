"""Public names of a package imported on first use (PEP 562), so that its torch-free
modules (engine.s3, engine.sampling_params, engine.structured.params) can be imported
by layers that must not load torch: the job store and spec validation."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, modules: dict[str, str]) -> Callable[[str], Any]:
    """A module __getattr__ for package: name -> the module that defines it."""

    def __getattr__(name: str) -> Any:
        if name not in modules:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(modules[name]), name)
        setattr(sys.modules[package], name, value)  # found directly from now on
        return value

    return __getattr__
