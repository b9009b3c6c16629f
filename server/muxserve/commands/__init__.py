"""CLI commands, one module each: ``NAME``, ``add_parser(subparsers)``, ``run(args) -> int``."""

from types import ModuleType

MODULES: list[ModuleType] = []
