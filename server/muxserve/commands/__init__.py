"""CLI commands, one module each: ``NAME``, ``add_parser(subparsers)``, ``run(args) -> int``."""

from types import ModuleType

from muxserve.commands import bench, export, package, serve

MODULES: list[ModuleType] = [serve, package, export, bench]
