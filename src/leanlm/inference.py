"""Inference as the command line does it: load a model (`load_model_and_tokenizer`, from `leanlm.pretrained`),
check a prompt against its context before any work, encode it (chat template or raw), and stream a continuation
through leanlm's decoding backend, plain or speculative (`generate_text`).

    from leanlm.inference import generate_text, load_model_and_tokenizer
    model, tok = load_model_and_tokenizer("smollm2")
    generate_text(model, tok, "Name three rivers.", max_new_tokens=64, temperature=0, top_k=0, seed=0, chat=True)

The Python API shaped like Hugging Face's `generate` is `leanlm.speculative.generate`.
"""

from __future__ import annotations

import torch

from leanlm.errors import LeanLMError
from leanlm.pretrained import load_model_and_tokenizer
from leanlm.speculative.heads import DraftHead
from leanlm.speculative.generation import decode_text
from leanlm.speculative.prompts import encode_chat
from leanlm.speculative.tree import TreeStrategy

__all__ = ["check_fits_context", "check_prompt", "checked_device", "context_length", "encode_prompt",
           "generate_text", "load_model_and_tokenizer", "use_chat"]


def checked_device(name: str) -> str:
    """`cpu`, `cuda` (or `cuda:N`), checked before any work; `auto` picks cuda when a GPU is visible."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name.split(":")[0] == "cuda":
        if not torch.cuda.is_available():
            raise LeanLMError(f"--device {name}: no GPU is visible here. Fix: use --device cpu (or auto)")
        return name
    raise LeanLMError(f"--device {name!r} is unknown. Fix: use cpu, cuda or auto")


def context_length(config) -> int | None:
    """The longest sequence a model was built for (`max_position_embeddings`), if its config says."""
    n = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_fits_context(model, prompt_tokens: int, max_new_tokens: int, what: str = "the prompt") -> None:
    """One clear error, before any decoding, when prompt + new tokens would run past the model's context."""
    limit = context_length(model.config)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        room = limit - prompt_tokens
        fix = f"use --max-new-tokens <= {room}" if room > 0 else "shorten the prompt"
        raise LeanLMError(f"{what} ({prompt_tokens} tokens) + --max-new-tokens {max_new_tokens} is longer than the "
                          f"model's context of {limit} tokens. Fix: {fix}")


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of `prompt`: as a user turn of the tokenizer's chat template (with the generation prompt) when
    `chat`, else the raw text for completion."""
    return encode_chat(tokenizer, prompt) if chat else tokenizer(prompt)["input_ids"]


def use_chat(tokenizer, chat: bool | None) -> bool:
    """`--chat` / `--no-chat`, or (neither given) whether the tokenizer has a chat template."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has:
        raise LeanLMError("--chat: this model's tokenizer has no chat template. Fix: drop --chat (raw completion)")
    return has if chat is None else chat


def check_prompt(model, tokenizer, prompt: str, max_new_tokens: int, chat: bool = False) -> None:
    """The prompt must give at least one token and, with the new tokens, fit the model's context."""
    n = len(encode_prompt(tokenizer, prompt, chat))
    if n == 0:
        raise LeanLMError("--prompt gives no tokens with this tokenizer. Fix: give some text to continue")
    check_fits_context(model, n, max_new_tokens)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
                  seed: int, stream: bool = True, chat: bool = False, compile: str = "off",
                  head: DraftHead | None = None, strategy: TreeStrategy | None = None) -> str:
    """Sample (or, at temperature 0, greedily decode) a continuation through leanlm's decoding backend, streamed to
    stdout. With `chat` the prompt is a user turn of the chat template and only the answer is printed and returned;
    without it the prompt is continued and printed with its continuation. With a draft `head` and a tree
    `strategy` it decodes speculatively (same law) and prints the step statistics after the text."""
    if stream and not chat:
        print(prompt, end="", flush=True)
    answer, stats = decode_text(model, tokenizer, encode_prompt(tokenizer, prompt, chat), max_new_tokens,
                                head=head, strategy=strategy, temperature=temperature, top_k=top_k, seed=seed,
                                compile=compile,
                                on_text=(lambda piece: print(piece, end="", flush=True)) if stream else None)
    if stream:
        print(flush=True)
    if stream and strategy is not None:
        st = stats.as_dict()
        compiled = f", compile {st['compile_seconds']:.0f} s" if st["compile_seconds"] else ""
        print(f"[{strategy.describe()}: {st['steps']} steps, tau {st['tau']:.2f} accepted draft tokens per step, "
              f"{st['candidates_per_step']:.1f} candidates verified per step, draft {st['draft_ms_per_step']:.1f} ms "
              f"+ verify {st['verify_ms_per_step']:.1f} ms per step{compiled}]")
    return answer if chat else prompt + answer
