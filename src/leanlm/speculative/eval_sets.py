"""The held-out prompt sets speculative decoding is measured on (`leanlm spec bench --prompts`).

    mtbench | gsm8k | humaneval   task prompts (`leanlm.speculative.prompts.load_prompts`): MT-bench's 80 first
                                  turns, GSM8K test questions, HumanEval functions
    sharegpt                      first user turns of held-out ShareGPT V3 conversations
                                  (`leanlm.speculative.sharegpt.heldout_prompts`): the side of the split that draft
                                  training never reads, the data a ShareGPT-trained head is closest to

The ShareGPT set lives here rather than in `prompts.py` because the ShareGPT split itself reads the task prompts
(conversations quoting one are dropped from both sides).
"""

from __future__ import annotations

from leanlm.speculative.prompts import PROMPT_SETS, load_prompts
from leanlm.speculative.sharegpt import heldout_prompts

EVAL_SETS = PROMPT_SETS + ("sharegpt",)


def load_eval_prompts(name: str, limit: int | None = None) -> list[str]:
    """The first `limit` prompts (all without one) of an evaluation set in `EVAL_SETS`."""
    if name == "sharegpt":
        return heldout_prompts(limit)
    return load_prompts(name, limit)
