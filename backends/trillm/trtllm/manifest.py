"""The two small JSON files that describe a built engine.

``<engine_dir>/trillm-engine.json`` (written by ``trillm build-engine``):
where the engine came from and how it was built::

    {"format": 1, "source_checkpoint": "/abs/ckpt", "source_config_sha256": "<sha256 of config.json>",
     "build_config": {...}, "tensorrt_llm_version": "1.0.0", "built_at": "2025-01-31T12:00:00+00:00"}

``<model_repository>/tensorrt_llm/<N>/engine.json`` (``--model-repository
--version N``): makes the engine model version N. It points at the engine;
beside it is the same ``model.py`` shim as every version::

    {"engine_dir": "/abs/engine"}

The engine host reads the pointer of the version it loads, so one
``config.pbtxt`` serves every version, each with its own engine. A version
number names the whole pipeline (trillm.versions), so version N is created in
every model of the repository. ``trillm serve`` serves the highest version by
default (version policy latest).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trillm.triton.errors import ConfigError
from trillm.versions import VersionError, add_pipeline_version, model_versions

MANIFEST_NAME = "trillm-engine.json"
POINTER_NAME = "engine.json"
MANIFEST_FORMAT = 1
ENGINE_MODEL = "tensorrt_llm"
# Every version directory of a Python-backend model needs the model file.
MODEL_SHIM = (
    '"""Triton model `tensorrt_llm`: a thin shim; the logic lives in trillm.triton.engine_host."""\n'
    "\n"
    "from trillm.triton.engine_host import TritonPythonModel  # noqa: F401\n"
)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def engine_manifest(checkpoint_dir: Path, build_config: dict[str, Any], tensorrt_llm_version: str) -> dict[str, Any]:
    checkpoint_dir = Path(checkpoint_dir).resolve()
    return {
        "format": MANIFEST_FORMAT,
        "source_checkpoint": str(checkpoint_dir),
        "source_config_sha256": sha256_file(checkpoint_dir / "config.json"),
        "build_config": build_config,
        "tensorrt_llm_version": tensorrt_llm_version,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_manifest(engine_dir: Path, manifest: dict[str, Any]) -> Path:
    path = Path(engine_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def new_version_dir(model_repository: Path, version: int) -> Path:
    """``<model_repository>/tensorrt_llm/<version>``, checked to be creatable.

    Refuses an existing version: a version's engine never changes under it.
    """
    if version < 1:
        raise ValueError(f"--version must be >= 1, got {version}")
    model_dir = Path(model_repository) / ENGINE_MODEL
    if not (model_dir / "config.pbtxt").exists():
        raise ValueError(f"{model_dir} holds no config.pbtxt: --model-repository must be a trillm model repository")
    version_dir = model_dir / str(version)
    taken = [model for model, versions in model_versions(model_repository).items() if version in versions]
    if taken:
        raise ValueError(
            f"version {version} already exists in {', '.join(taken)}: pick a new --version "
            "(a version's engine never changes)"
        )
    return version_dir


def write_version(model_repository: Path, version: int, engine_dir: Path) -> Path:
    """Create version ``version`` of the pipeline, its ``tensorrt_llm`` pointing at ``engine_dir``."""
    version_dir = new_version_dir(model_repository, version)
    try:
        add_pipeline_version(model_repository, version)
    except VersionError as exc:
        raise ValueError(str(exc)) from None
    if not (version_dir / "model.py").exists():
        (version_dir / "model.py").write_text(MODEL_SHIM)
    pointer = {"engine_dir": str(Path(engine_dir).resolve())}
    (version_dir / POINTER_NAME).write_text(json.dumps(pointer, indent=2) + "\n")
    return version_dir


def read_pointer(version_dir: Path) -> Path | None:
    """The engine dir named by ``<version_dir>/engine.json``, or None without one."""
    path = Path(version_dir) / POINTER_NAME
    if not path.exists():
        return None
    try:
        engine_dir = json.loads(path.read_text())["engine_dir"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: expected {{\"engine_dir\": \"/path/to/engine\"}} ({exc!r})") from exc
    return Path(engine_dir)
