"""Looking models up by name and version: the same rules in the engine's registry and in a
frontend's copy of its index."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from muxserve.serving.errors import ModelNotFound, NotReady


class Versioned(Protocol):
    version: str
    state: str
    reason: str

    @property
    def ready(self) -> bool: ...


M = TypeVar("M", bound=Versioned)


class ModelCatalog(Generic[M]):
    def __init__(self) -> None:
        self.models: dict[str, dict[str, M]] = {}  # name -> version -> model

    def all(self) -> list[M]:
        return [m for versions in self.models.values() for m in versions.values()]

    def find(self, name: str, version: str = "") -> M:
        """The requested version (default: the highest loaded); 404 when unknown."""
        versions = self.models.get(name)
        if not versions:
            raise ModelNotFound(f"unknown model: '{name}'")
        if version:
            if version not in versions:
                raise ModelNotFound(f"unknown version {version} of model '{name}' (have: {', '.join(sorted(v for v in versions if v))})")
            return versions[version]
        if len(versions) == 1:  # the common case: one version, whatever its state
            return next(iter(versions.values()))
        ready = [m for m in versions.values() if m.ready]
        pool = ready or list(versions.values())
        return max(pool, key=lambda m: int(m.version) if m.version.isdigit() else -1)

    def get_ready(self, name: str, version: str = "") -> M:
        return self.require_ready(name, self.find(name, version))

    @staticmethod
    def require_ready(name: str, served: M) -> M:
        """``served`` (found by ``find``) if it is ready; 503 if not."""
        if not served.ready:
            raise NotReady(f"model '{name}' version {served.version or '?'} is not ready: {served.reason or served.state}")
        return served
