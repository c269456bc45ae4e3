"""Shared test set-up.

CI sets MLX_QWEN36_STRICT=1: a check that skips because something it needs is missing (torch and transformers,
the shared spec fixtures, the offline tokenizer) then fails instead, so CI never passes on checks it did not run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STRICT = os.environ.get("MLX_QWEN36_STRICT") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under MLX_QWEN36_STRICT=1 (CI must run every check): {reason}"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "fixtures" / "qwen3_6_chat_template.jinja").is_file():
        pytest.skip(f"the shared spec folder is absent ({SHARED})")
    return SHARED


FIXTURES = ROOT / "tests" / "fixtures"
KINDS = ("moe", "dense")


def reference_available() -> bool:
    if os.environ.get("MLX_QWEN36_NO_REFERENCE") == "1":  # check the committed fixtures as a torch-less run would
        return False
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def require_video_reference() -> None:
    """transformers' video processor needs torchvision, which the reference extra installs with torch."""
    if not reference_available():
        pytest.skip("torch and transformers are not installed (reference extra): cannot compare with transformers")
    try:
        import torchvision  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"torchvision does not import ({exc}): transformers' video processor needs it (reference extra)")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """Tiny checkpoints and reference logits per kind: {"moe": {"hf": dir, "release": dir, "golden": npz}, ...}.

    Built live with transformers when it is installed (CI), else read from the committed fixtures.
    """
    import numpy as np

    if reference_available():
        import reference

        out = tmp_path_factory.mktemp("reference")
        models = {}
        for kind in KINDS:
            paths = reference.write_checkpoints(kind, out)
            models[kind] = dict(paths, golden=reference.golden(paths))
        models["live"] = True
        return models
    models = {kind: {"hf": FIXTURES / f"{kind}-hf", "release": FIXTURES / f"{kind}-release",
                     "golden": dict(np.load(FIXTURES / f"{kind}-golden.npz"))} for kind in KINDS}
    models["live"] = False
    return models


@pytest.fixture(scope="session")
def chat_dir(shared_dir, tmp_path_factory) -> Path:
    """A tiny random MoE model with the real vocabulary size, and the real Qwen3.6 tokenizer and chat template:
    what the generator, chat and examples tests run on (the reference-built tiny models have a 512-token vocab)."""
    from tokenizer_fixture import write_chat_checkpoint

    return write_chat_checkpoint(tmp_path_factory.mktemp("chat") / "tiny-moe", shared_dir)


@pytest.fixture(scope="session")
def mtp_chat_dir(shared_dir, tmp_path_factory) -> Path:
    """`chat_dir`'s model with an MTP head, for speculative decoding."""
    from tokenizer_fixture import write_chat_checkpoint

    return write_chat_checkpoint(tmp_path_factory.mktemp("chat-mtp") / "tiny-moe", shared_dir, mtp_num_hidden_layers=1)


@pytest.fixture(scope="session")
def vl_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny vision-language checkpoint (weights only, real vocabulary) and a picture in a folder of its own."""
    import mlx.core as mx
    import numpy as np
    from PIL import Image

    from mlx_qwen36 import synthetic

    folder = tmp_path_factory.mktemp("vl")
    text = synthetic.text_config("tiny", vocab_size=248320)
    synthetic.write_checkpoint(folder, text, dtype=mx.float32,
                               vision=synthetic.vision_config("tiny", text["hidden_size"]))
    picture = folder / "media" / "picture.png"
    picture.parent.mkdir()
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)).save(picture)
    return folder, picture
