"""Callable job packages: ``rankwise.compress(...)``, ``rankwise.analyze(...)``, ...

Importing a subpackage such as ``rankwise.compress`` binds it to the attribute of the same name on
``rankwise``, shadowing the API function. Making the package module itself callable keeps
``rankwise.<verb>(...)`` working whatever was imported first.
"""
from __future__ import annotations

import importlib
import sys
import types


def make_callable(package: str, target: str) -> None:
    """Turn module ``package`` into one whose call forwards to ``target`` ("module:function")."""
    mod_name, func_name = target.split(":")

    class _CallablePackage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(importlib.import_module(mod_name), func_name)(*args, **kwargs)

    sys.modules[package].__class__ = _CallablePackage
