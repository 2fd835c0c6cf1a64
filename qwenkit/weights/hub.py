"""Hub ids to local files: the Hugging Face hub or ModelScope, GGUF repos by quantization tag, split
GGUFs, pinned revisions.

`Qwen/Qwen2.5-7B-Instruct-GGUF:Q4_K_M` names a GGUF repo and the quantization to take from it, as
llama.cpp's `-hf` and Ollama's `hf.co/...` do: the tag picks the file (case-insensitive) and, for a
model split by gguf-split (`...-00001-of-00003.gguf`), all of its parts. Without a tag a repo with a
checkpoint (config.json + safetensors) gives the checkpoint; a GGUF-only repo gives its only model,
else Q4_K_M (llama.cpp's default). The local cache is tried first, so a downloaded model needs no network.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qwenkit.errors import QwenkitError
from qwenkit.formats.gguf_reader import SPLIT_NAME

SOURCES = ("huggingface", "modelscope")
# What a safetensors checkpoint needs from its repo (GGUF files are picked by tag instead).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]
DEFAULT_GGUF_TAG = "Q4_K_M"
_HUB_ID = re.compile(r"^(?:(?:https://)?(?:hf\.co|huggingface\.co)/)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<tag>[\w.-]+))?$")
# The quantization tag at the end of a GGUF file's name: Q4_K_M, IQ4_XS, Q8_0, F16, BF16 ...
_TAG_AT_END = re.compile(r"(?i)[-._](I?Q\d\w*|BF16|F16|F32)$")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    tag: str | None = None  # quantization tag of a GGUF repo
    revision: str | None = None  # branch, tag or commit; None: the default branch
    source: str = "huggingface"

    def __str__(self) -> str:
        return self.repo_id + (f":{self.tag}" if self.tag else "") + (f"@{self.revision}" if self.revision else "")


def default_source() -> str:
    """ModelScope when QWENKIT_USE_MODELSCOPE is set true (as vLLM's VLLM_USE_MODELSCOPE), else Hugging Face."""
    return "modelscope" if os.environ.get("QWENKIT_USE_MODELSCOPE", "").lower() in ("1", "true", "yes") else "huggingface"


def parse_hub_id(spec: str, revision: str | None = None, source: str | None = None) -> HubRef | None:
    """The hub reference `spec` names (owner/name[:TAG], optionally hf.co/...), or None if it is not one."""
    if spec.startswith((".", "/", "~")):
        return None
    m = _HUB_ID.match(spec)
    if m is None:
        return None
    source = source or default_source()
    if source not in SOURCES:
        raise QwenkitError(f"unknown model source {source!r}; choose one of {', '.join(SOURCES)}")
    return HubRef(m["repo"], m["tag"], revision, source)


# ---- choosing files ---------------------------------------------------------------------------


def is_mmproj_name(file: str) -> bool:
    """A multimodal projector (llama.cpp's mmproj GGUF), by the name every converter and repo gives it."""
    name = file.rsplit("/", 1)[-1].lower()
    return name.endswith(".gguf") and "mmproj" in name


def gguf_models(files: list[str]) -> dict[str, list[str]]:
    """The repo's GGUF models by name (split suffix and .gguf dropped) -> their files, parts in order.
    Multimodal projector files (mmproj) are no language model and are left out."""
    models: dict[str, list[str]] = {}
    for f in sorted(files):
        if not f.lower().endswith(".gguf") or is_mmproj_name(f):
            continue
        m = SPLIT_NAME.match(f)
        key = m["prefix"] if m else f[: -len(".gguf")]
        models.setdefault(key, []).append(f)
    return models


def _has_tag(model: str, tag: str) -> bool:
    # The tag as a whole word of the name: Q4_K matches "...-Q4_K.gguf" but not "...-Q4_K_M.gguf".
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(tag)}(?![A-Za-z0-9_])", model, re.IGNORECASE) is not None


def model_tag(model: str) -> str:
    m = _TAG_AT_END.search(model)
    return m.group(1) if m else model.rsplit("/", 1)[-1]


def select_gguf(files: list[str], tag: str | None, repo: str) -> list[str]:
    """The file(s) of the GGUF model `tag` names in a repo listing `files`: one, or every split part."""
    models = gguf_models(files)
    if not models:
        raise QwenkitError(f"{repo} has no .gguf files" + (f" (so no {tag!r} quantization)" if tag else ""))
    available = ", ".join(sorted(model_tag(m) for m in models))
    if tag is None and len(models) == 1:
        (chosen,) = models
    else:
        wanted = tag or DEFAULT_GGUF_TAG
        matches = [m for m in models if _has_tag(m, wanted)]
        if not matches:
            hint = "" if tag else f"; no tag given and there is no {DEFAULT_GGUF_TAG}: add one as {repo}:TAG"
            raise QwenkitError(f"no GGUF file in {repo} has the quantization tag {wanted!r}{hint}; available: {available}")
        if len(matches) > 1:
            raise QwenkitError(f"tag {wanted!r} matches several GGUF models in {repo}: {', '.join(matches)}; name one of them")
        (chosen,) = matches
    parts = models[chosen]
    m = SPLIT_NAME.match(parts[0])
    if m is not None and len(parts) != int(m["count"]):
        raise QwenkitError(f"{repo} lists {len(parts)} of the {int(m['count'])} parts of split GGUF {chosen}")
    return parts


def select_mmproj(files: list[str]) -> str | None:
    """A GGUF repo's vision tower, fetched with its model as llama.cpp's -hf does: the F16 one where
    a repo offers several types; None if the repo has none."""
    projectors = sorted(f for f in files if is_mmproj_name(f))
    f16 = [f for f in projectors if _has_tag(f.rsplit("/", 1)[-1].removesuffix(".gguf"), "F16")]
    return (f16 or projectors or [None])[0]


def _is_checkpoint(files: list[str]) -> bool:
    return "config.json" in files and any(f.endswith(".safetensors") for f in files)


def wanted_files(files: list[str], ref: HubRef) -> tuple[list[str], bool]:
    """(patterns or file names to download, whether it is a GGUF) for a repo listing `files`."""
    if ref.tag is None and _is_checkpoint(files):
        return HUB_PATTERNS, False
    return select_gguf(files, ref.tag, ref.repo_id), True


# ---- the two hubs -----------------------------------------------------------------------------


class _HuggingFace:
    name = "Hugging Face hub"

    def list_files(self, ref: HubRef) -> list[str]:
        from huggingface_hub import HfApi

        return list(HfApi().list_repo_files(ref.repo_id, revision=ref.revision))

    def download(self, ref: HubRef, patterns: list[str] | None, local_only: bool) -> Path:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns, local_files_only=local_only))

    def cached_dir(self, ref: HubRef) -> Path | None:
        """The cached snapshot of the revision, read from the cache layout (refs/NAME holds the commit):
        snapshot_download(local_files_only=True) refuses a snapshot missing files we never wanted."""
        from huggingface_hub import constants

        repo = Path(constants.HF_HUB_CACHE) / f"models--{ref.repo_id.replace('/', '--')}"
        revision = ref.revision or "main"
        ref_file = repo / "refs" / revision
        commit = ref_file.read_text().strip() if ref_file.is_file() else revision
        snapshot = repo / "snapshots" / commit
        return snapshot if snapshot.is_dir() else None

    def not_found(self, exc: Exception) -> str | None:
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        if isinstance(exc, RevisionNotFoundError):
            return "revision not found"
        if isinstance(exc, RepositoryNotFoundError):
            return "repository not found (or private: log in with `hf auth login`)"
        if isinstance(exc, EntryNotFoundError):
            return "file not found"
        return None


class _ModelScope:
    """modelscope>=1.38 (its hub client is the modelscope-hub package): snapshots are cached by revision
    name, not commit, at $MODELSCOPE_CACHE/models/OWNER--NAME/snapshots/REVISION (REVISION "master" when
    none is given); an older modelscope's models/OWNER/NAME (dots in NAME as ___) is reused for any revision."""

    name = "ModelScope hub"

    def _check(self) -> None:
        try:
            import modelscope  # noqa: F401
        except ImportError:
            raise QwenkitError("ModelScope as a source needs the modelscope package: pip install modelscope") from None

    def list_files(self, ref: HubRef) -> list[str]:
        self._check()
        from modelscope.hub.api import HubApi

        with _without_retry_lines():
            entries = HubApi().get_model_files(ref.repo_id, revision=ref.revision, recursive=True)
        paths = {f["Path"] for f in entries if f.get("Type") != "tree"}
        # modelscope>=1.38 lists directories too but drops the Type that told them apart: a parent of others
        parents = {p.rsplit("/", i)[0] for p in paths for i in range(1, p.count("/") + 1)}
        return sorted(paths - parents)

    def download(self, ref: HubRef, patterns: list[str] | None, local_only: bool) -> Path:
        self._check()
        from modelscope import snapshot_download

        with _without_retry_lines():
            return Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns, local_files_only=local_only))

    def cached_dir(self, ref: HubRef) -> Path | None:
        """The cached snapshot of the revision, read from the cache layout: snapshot_download(local_files_only=True)
        without a revision takes any single cached revision (a --revision v1 download stands in for master)."""
        legacy = _modelscope_legacy_dir(ref.repo_id)
        if legacy is not None:  # where modelscope downloads every revision to, when it exists
            return legacy
        snapshot = _modelscope_roots()[0] / ref.repo_id.replace("/", "--") / "snapshots" / (ref.revision or "master")
        return snapshot if snapshot.is_dir() and any(snapshot.iterdir()) else None  # empty: a download that failed

    def not_found(self, exc: Exception) -> str | None:
        from modelscope.hub.errors import NotExistError

        # HubApi raises NotExistError (HTTP 404); snapshot_download wraps it in a requests HTTPError.
        if isinstance(exc, NotExistError) or isinstance(exc.__cause__, NotExistError):
            return "repository or revision not found"
        return None


class _DropInfoAndRetries(logging.Filter):
    """The modelscope client's INFO lines and its listing-retry warnings ("retry in 1s (1/4)"),
    which would precede our one-line errors; its other warnings (an incomplete listing), its
    errors and every other logger's lines still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("modelscope"):
            return True
        return record.levelno > logging.WARNING or (record.levelno == logging.WARNING and "retry" not in record.getMessage().lower())


@contextmanager
def _without_retry_lines() -> Iterator[None]:
    """For the length of one call into the modelscope client (the handlers are left as they were
    after). On the handlers, not the logger: its child loggers' lines (modelscope_hub.legacy_api)
    pass only through the handlers."""
    quiet = _DropInfoAndRetries()
    handlers = logging.getLogger("modelscope_hub").handlers + logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def _modelscope_cache() -> Path:
    return Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope").expanduser()


def _modelscope_roots() -> tuple[Path, Path]:
    """Where ModelScope's caches keep models: models/ (modelscope >= 1.38, and an older one's with
    MODELSCOPE_CACHE set) and hub/models/ (an older one's default)."""
    base = _modelscope_cache()
    return base / "models", base / "hub" / "models"


def _modelscope_legacy_dir(repo_id: str) -> Path | None:
    """An older modelscope's (<=1.37) cache directory of the repo, if one is there (modelscope-hub's
    DownloadManager._find_legacy_repo_dir probes the same two places)."""
    owner, name = repo_id.split("/", 1)
    for root in _modelscope_roots():
        candidate = root / owner / name.replace(".", "___")
        if candidate.is_dir() and any(candidate.iterdir()):
            return candidate
    return None


def _hub(source: str):
    return _ModelScope() if source == "modelscope" else _HuggingFace()


# ---- fetching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubModel:
    path: Path  # the checkpoint directory, or the (first) GGUF file
    is_gguf: bool
    mmproj: Path | None = None  # a GGUF repo's vision tower, if it has one


def fetch(ref: HubRef) -> HubModel:
    """The local copy of `ref`: from the cache if complete there, else downloaded."""
    hub = _hub(ref.source)
    cached, cache_error = _from_cache(hub, ref)
    if cached is not None:
        return cached
    try:
        files = hub.list_files(ref)
        patterns, is_gguf = wanted_files(files, ref)
        mmproj = select_mmproj(files) if is_gguf else None
        directory = hub.download(ref, patterns + ([mmproj] if mmproj else []), local_only=False)
    except QwenkitError:
        raise
    except Exception as exc:  # the hub clients raise many kinds (HTTP, connection, offline mode): one line each
        reason = hub.not_found(exc)
        if reason:
            raise QwenkitError(f"{ref} on the {hub.name}: {reason}") from exc
        if cache_error is not None:  # offline, but the repo is cached: say why the cached files do not do
            raise QwenkitError(f"{cache_error} (offline: searched the local cache)") from exc
        raise QwenkitError(
            f"cannot download {ref} from the {hub.name} and it is not in the local cache (offline? "
            f"{type(exc).__name__}); connect, or pass a local checkpoint directory or .gguf file with --model PATH"
        ) from exc
    if is_gguf:
        return HubModel(directory / patterns[0], True, directory / mmproj if mmproj else None)
    return HubModel(directory, False)


def _from_cache(hub, ref: HubRef) -> tuple[HubModel | None, QwenkitError | None]:
    """(the cached model if complete, else None; why the cached files do not hold `ref`, if they do not)."""
    directory = hub.cached_dir(ref)
    if directory is None or not directory.is_dir():
        return None, None
    files = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()]
    try:
        patterns, is_gguf = wanted_files(files, ref)
    except QwenkitError as exc:
        return None, exc  # the cached files do not hold what is asked for: ask the hub
    if is_gguf:
        mmproj = select_mmproj(files)
        return HubModel(directory / patterns[0], True, directory / mmproj if mmproj else None), None
    return (HubModel(directory, False) if _checkpoint_complete(directory) else None), None


def _checkpoint_complete(directory: Path) -> bool:
    import json

    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return all((directory / s).exists() for s in shards)
    return (directory / "model.safetensors").exists()


# ---- what is cached ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedModel:
    name: str  # what to pass to --model
    format: str  # "gguf Q4_K_M", "gguf Q4_K_M, 3 parts", "safetensors"
    size: int  # bytes on disk
    path: Path
    source: str


def _describe(directory: Path, repo: str, source: str) -> list[CachedModel]:
    files = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()]
    found = []
    for model, parts in gguf_models(files).items():
        tag = model_tag(model)
        size = sum((directory / f).stat().st_size for f in parts)
        kind = f"gguf {tag}" + (f", {len(parts)} parts" if len(parts) > 1 else "")
        found.append(CachedModel(f"{repo}:{tag}", kind, size, directory / parts[0], source))
    if _is_checkpoint(files):
        size = sum((directory / f).stat().st_size for f in files)
        found.append(CachedModel(repo, "safetensors", size, directory, source))
    return found


def cached_models() -> list[CachedModel]:
    """Models in the Hugging Face and ModelScope caches (every cached revision)."""
    found: list[CachedModel] = []
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type != "model":
                continue
            for revision in repo.revisions:
                found += _describe(Path(revision.snapshot_path), repo.repo_id, "huggingface")
    except Exception:  # no cache directory yet (CacheNotFound) or one being written: nothing to list
        pass
    for repo_id, directory in _modelscope_snapshots():
        found += _describe(directory, repo_id, "modelscope")
    return found


def _modelscope_snapshots() -> list[tuple[str, Path]]:
    """(repo id, directory) of every cached ModelScope snapshot: models/OWNER--NAME/snapshots/REVISION,
    and an older modelscope's models/OWNER/NAME (also under hub/, its default cache then)."""
    def subdirs(path: Path) -> list[Path]:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")) if path.is_dir() else []

    found = []
    for top in [top for root in _modelscope_roots() for top in subdirs(root)]:
        if (top / "snapshots").is_dir():
            found += [(top.name.replace("--", "/", 1), snapshot) for snapshot in subdirs(top / "snapshots")]
        else:
            found += [(f"{top.name}/{repo.name.replace('___', '.')}", repo) for repo in subdirs(top)]
    return found
