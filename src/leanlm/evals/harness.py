"""lm-eval-harness adapter: score leanlm (or any local HF causal LM) with `lm_eval`'s `LM` interface.

    from leanlm.evals.harness import LeanLMHarnessLM
    lm = LeanLMHarnessLM.from_path("runs/tiny/checkpoints/step-00000300", batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=[...])

Importing this module registers the model name `leanlm` with lm-eval's registry, so
`--model leanlm --model_args pretrained=PATH,batch_size=16` works as well. Log-likelihoods come from
`leanlm.evals.scorer` (the same code as `leanlm eval --tasks`), rolling log-likelihoods from non-overlapping
windows of the model's context length, and generation from `model.generate` (greedy unless `do_sample`).
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from leanlm.evals.scorer import LoglikelihoodScorer


@register_model("leanlm")
class LeanLMHarnessLM(LM):
    def __init__(self, model=None, tokenizer=None, pretrained: str | None = None, batch_size: int | str = 16,
                 max_length: int | None = None, device: str = "cpu"):
        super().__init__()
        if model is None:
            from leanlm.cli import load_model_and_tokenizer

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

    @torch.no_grad()
    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        window = self.scorer.max_length
        eos = self.tokenizer.eos_token_id
        for r in requests:
            ids = ([eos] if eos is not None else []) + self.tokenizer(r.args[0], add_special_tokens=False)["input_ids"]
            total = 0.0
            for start in range(0, len(ids) - 1, window):
                chunk = torch.tensor(ids[start : start + window + 1])[None]
                logits = self.model(input_ids=chunk[:, :-1]).logits.float()
                lp = torch.log_softmax(logits, -1).gather(-1, chunk[:, 1:, None])
                total += float(lp.sum())
            out.append(total)
        return out

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
