"""Turn what the user typed after --model into a local checkpoint: directory, .gguf file, hub id, or default."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from qwenkit.errors import QwenkitError
from qwenkit.weights.default_model import ensure_assembled

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]


class WeightFormat(Enum):
    HF = "hf"  # a directory with config.json and safetensors
    GGUF = "gguf"  # one .gguf file


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    format: WeightFormat


def resolve_model(spec: str | None) -> ResolvedModel:
    if spec is None:
        return ResolvedModel(ensure_assembled(), WeightFormat.GGUF)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".gguf" or _has_gguf_magic(path):
            return ResolvedModel(path, WeightFormat.GGUF)
        raise QwenkitError(f"{path} is neither a .gguf file nor a checkpoint directory")
    if path.is_dir():
        if (path / "config.json").exists():
            return ResolvedModel(path, WeightFormat.HF)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(ggufs[0], WeightFormat.GGUF)
        raise QwenkitError(f"{path} has no config.json (and not exactly one .gguf file)")
    if _REPO_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ResolvedModel(download_from_hub(spec), WeightFormat.HF)
    raise QwenkitError(f"no such model path: {spec}")


def download_from_hub(repo_id: str) -> Path:
    # Imported here: it is slow to import and only needed for hub ids.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass  # not cached yet
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError as exc:
        raise QwenkitError(f"hub repository {repo_id!r} not found (or private: log in with `hf auth login`)") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise QwenkitError(
            f"cannot download {repo_id!r} from the Hugging Face hub (offline?); "
            f"pass a local checkpoint directory or .gguf file with --model PATH"
        ) from exc


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
