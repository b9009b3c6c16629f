"""The model repository in Triton's layout: ``<repo>/<model>/config.pbtxt`` + ``<model>/<v>/``.

``config.pbtxt`` is parsed with Triton's own ``ModelConfig`` protobuf (text format) from
``tritonclient.grpc.model_config_pb2``; mux settings travel in ``parameters``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from muxserve.model.weights import CONFIG_FILE

CONFIG_PBTXT = "config.pbtxt"
# a model family: Triton's ensemble platform, its steps the members, this policy in parameters
FAMILY_PLATFORM = "ensemble"
FAMILY_POLICY = "load_adaptive"


class RepositoryError(Exception):
    pass


@dataclass
class ModelEntry:
    """One model folder: its parsed config and its version folders."""

    name: str
    path: Path
    config: mc.ModelConfig
    versions: dict[int, Path] = field(default_factory=dict)

    def parameter(self, key: str, default: str | None = None) -> str | None:
        if key in self.config.parameters:
            return self.config.parameters[key].string_value
        return default

    def device(self, override: str = "") -> str:
        """Where the model runs: ``override`` (``--device``), else its first ``instance_group``
        (KIND_GPU: cuda, on its first listed GPU), else cpu."""
        groups = self.config.instance_group
        device = override or ("cuda" if groups and groups[0].kind == mc.ModelInstanceGroup.KIND_GPU else "cpu")
        if device == "cuda" and groups and groups[0].gpus:
            device = f"cuda:{groups[0].gpus[0]}"
        return device

    @property
    def is_family(self) -> bool:
        return self.config.platform == FAMILY_PLATFORM

    def member_names(self) -> list[str]:
        """A family's members: the models its ``ensemble_scheduling`` steps name."""
        return [step.model_name for step in self.config.ensemble_scheduling.step]

    def served_versions(self) -> list[int]:
        """Versions to load, per ``version_policy`` (default: latest 1, as Triton)."""
        available = sorted(self.versions)
        if not available:
            return []
        policy = self.config.version_policy
        kind = policy.WhichOneof("policy_choice")
        if kind == "all":
            return available
        if kind == "specific":
            return [v for v in policy.specific.versions if v in self.versions]
        n = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions > 0 else 1
        return available[-n:]


def parse_config(path: str | Path) -> mc.ModelConfig:
    config = mc.ModelConfig()
    try:
        text_format.Parse(Path(path).read_text(), config)
    except text_format.ParseError as exc:
        raise RepositoryError(f"{path}: {exc}") from exc
    return config


def scan(repository: str | Path) -> dict[str, ModelEntry]:
    """Every folder with a config.pbtxt; the config's ``name`` must match the folder (as Triton)."""
    root = Path(repository)
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a directory")
    entries: dict[str, ModelEntry] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        cfg_path = folder / CONFIG_PBTXT
        if not cfg_path.exists():
            continue
        config = parse_config(cfg_path)
        if not config.name:
            config.name = folder.name
        versions = {int(v.name): v for v in folder.iterdir() if v.is_dir() and v.name.isdigit()}
        entries[folder.name] = ModelEntry(folder.name, folder, config, versions)
    return entries


def resolve_model_dir(repository: str | Path, model: str, version: int | None = None) -> Path:
    """A model folder with weights: ``model`` itself if it holds muxbert.json, else a version
    folder of ``repository/model`` (the highest, unless ``version`` is given)."""
    direct = Path(model)
    if (direct / CONFIG_FILE).exists():
        return direct
    entries = scan(repository)
    if model not in entries:
        raise RepositoryError(f"unknown model {model!r} in {repository} (have: {', '.join(sorted(entries)) or 'none'})")
    entry = entries[model]
    if version is None:
        if not entry.versions:
            raise RepositoryError(f"model {model!r} has no version folders")
        version = max(entry.versions)
    if version not in entry.versions:
        raise RepositoryError(f"model {model!r} has no version {version}")
    return entry.versions[version]
