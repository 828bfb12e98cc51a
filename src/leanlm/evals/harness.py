"""lm-eval-harness adapter: score leanlm (or any local HF causal LM) with `lm_eval`'s `LM` interface.

    from leanlm.evals.harness import LeanLMHarnessLM
    lm = LeanLMHarnessLM.from_path("runs/tiny/checkpoints/step-00000300", batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=[...])

Importing this module registers the model name `leanlm` with lm-eval's registry, so
`--model leanlm --model_args pretrained=PATH,batch_size=16` works as well. Log-likelihoods come from
`leanlm.evals.scorer` (the same code as `leanlm eval --tasks`), rolling log-likelihoods from the same
non-overlapping windows of the model's context length as `leanlm.evals.perplexity`, and generation from
`model.generate` (greedy unless `do_sample`).
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from leanlm.evals.perplexity import document_windows, windows_nll
from leanlm.evals.scorer import LoglikelihoodScorer
from leanlm.pretrained import load_model_and_tokenizer


@register_model("leanlm")
class LeanLMHarnessLM(LM):
    def __init__(self, model=None, tokenizer=None, pretrained: str | None = None, batch_size: int | str = 16,
                 max_length: int | None = None, device: str = "cpu"):
        super().__init__()
        if model is None:

            model, tokenizer = load_model_and_tokenizer(pretrained, device=device)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.scorer = LoglikelihoodScorer(model, tokenizer, batch_size=int(batch_size), max_length=max_length,
                                          progress=False)

    @classmethod
    def from_path(cls, path: str, **kwargs) -> "LeanLMHarnessLM":
        return cls(pretrained=path, **kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LeanLMHarnessLM":
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None and k in ("batch_size",
                                                                                                    "device")})
        return cls(**args)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        scores = self.scorer.score([tuple(r.args) for r in requests])
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests) -> list[float]:
        seq_len = self.scorer.max_length
        return [-sum(windows_nll(self.model, document_windows(self.tokenizer, r.args[0], seq_len),
                                 self.scorer.batch_size)) for r in requests]

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            enc = self.tokenizer(context, return_tensors="pt")
            gen = self.model.generate(**enc, max_new_tokens=max_new, do_sample=do_sample and temperature > 0,
                                      temperature=temperature if do_sample and temperature > 0 else None,
                                      pad_token_id=self.tokenizer.eos_token_id)
            text = self.tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out
