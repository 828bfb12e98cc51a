"""`leanlm demo`: the guided tour a newcomer runs first, on 2 CPU cores in a few minutes.

Step by step it prints what each stage achieved:
  1. data      the bundled English corpus (Shakespeare, Milton, KJV, Brown), split by document, BPE-tokenized
  2. train     the `tiny-asa` config (~5M parameters, Alternating Sparse Attention: sliding-window MLA layers
               alternating with compression + selection GLA layers) from scratch with WISCA transitions (at step 0
               and every 100 steps), with validation perplexity along the way
  3. evaluate  validation perplexity of the final checkpoint, reloaded from disk with `from_pretrained`
  4. generate  a sampled continuation from the trained model, with its KV cache
  5. kv cache  the cache the model really held while decoding, against the exact accounting, and what the same
               model would hold with full GQA or NSA attention at long contexts

  6. speculate SmolLM2-135M-Instruct answering held-out MT-bench questions greedily: plain decoding, EAGLE-2 and C2T
               trees with the ShareGPT-trained draft head and classifier committed under assets/ (outputs checked
               identical), at the papers' default sizes and at the sizes the cost model picks from this machine's
               measured step costs and the trees committed beside the classifier
"""

from __future__ import annotations

import time

import torch

from leanlm.data import prepare_data
from leanlm.evals.perplexity import validation_perplexity
from leanlm.inference import generate_text, load_model_and_tokenizer
from leanlm.kvreport import cache_bytes, kv_report
from leanlm.pretrained import committed_draft
from leanlm.runconfig import load_run_config
from leanlm.speculative.bench import describe_sizes, run_bench, sized_strategies
from leanlm.speculative.c2t import C2T, C2TClassifier
from leanlm.speculative.c2t_train import load_rows
from leanlm.speculative.draft import EagleDraftHead
from leanlm.speculative.prompts import encode_chat, load_prompts
from leanlm.speculative.tree import Eagle2
from leanlm.train import Trainer
from leanlm.wisca import WiscaCallback


def _banner(i: int, title: str) -> None:
    print(f"\n=== [{i}] {title} " + "=" * max(0, 60 - len(title)), flush=True)


def run_demo(out_dir: str = "runs/demo", steps: int | None = None, spec_prompts: int = 2,
             spec_tokens: int = 64) -> dict:
    t0 = time.perf_counter()
    # The demo owns its out_dir: each run starts from scratch there (train.overwrite replaces the previous demo run).
    overrides = [f"train.out_dir={out_dir}", "train.resume=never", "train.overwrite=true", "wisca.every=100"]
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    run = load_run_config("tiny-asa", overrides)

    _banner(1, "data: bundled English corpus -> BPE tokens")
    t = time.perf_counter()
    data = prepare_data(run.data, run.model["vocab_size"])
    m = data.meta
    print(f"{m['train_docs']} training and {m['val_docs']} validation documents (split by document); "
          f"{m['train_tokens']:,} / {m['val_tokens']:,} tokens with a {m['vocab']}-token BPE "
          f"({time.perf_counter() - t:.1f}s, cached in {data.dir})")

    _banner(2, "train: tiny ASA model from scratch, with WISCA weight rescaling")
    t = time.perf_counter()
    wisca_cb = WiscaCallback(run.wisca)  # the demo's overrides turn the wisca section on
    trainer = Trainer(run, callbacks=[wisca_cb], data=data)
    cfg = trainer.model.config
    n_params = sum(p.numel() for p in trainer.model.parameters())
    roles = ", ".join(f"{i}: {cfg.asa_role(i)}" for i in range(cfg.num_hidden_layers))
    print(f"{n_params / 1e6:.1f}M parameters; ASA layers ({roles}); window {cfg.nsa_window}, top-"
          f"{cfg.nsa_select_count} of {cfg.nsa_select_block}-token blocks; {run.train.max_steps} steps of "
          f"{trainer.tokens_per_step:,} tokens ({run.data.seq_len} per sequence), AdamW + warm-up/cosine")
    first_val = trainer.evaluate()["val_ppl"]
    metrics = trainer.fit()
    print(f"WISCA: {len(wisca_cb.log)} output-preserving transitions (steps "
          f"{', '.join(str(r['step']) for r in wisca_cb.log)}), Q/K and V/O factors between "
          f"{min(r['factor_min'] for r in wisca_cb.log):.2f} and {max(r['factor_max'] for r in wisca_cb.log):.2f}, "
          f"{wisca_cb.seconds * 1000:.0f} ms in all")
    ckpt = trainer.last_checkpoint
    print(f"validation perplexity {first_val:,.0f} at init -> {metrics['val_ppl']:.1f} after training "
          f"({time.perf_counter() - t:.0f}s); loss curve {trainer.out_dir / 'loss.png'}")

    _banner(3, "evaluate: reload the checkpoint and measure validation perplexity")
    model, tokenizer = load_model_and_tokenizer(str(ckpt))
    # The same validation windows as the trainer's final evaluation, so the reloaded model must match it.
    ev = validation_perplexity(model, run.to_dict(), batches=run.train.eval_batches, batch_size=run.train.batch_size)
    print(f"{ckpt}: validation perplexity {ev['val_ppl']:.1f} over {ev['tokens']:,} held-out tokens")

    _banner(4, "generate: sample a continuation")
    prompt = "KING HENRY.\n"
    print("-" * 70)
    text = generate_text(model, tokenizer, prompt, max_new_tokens=80, temperature=0.8, top_k=40, seed=0)
    print("-" * 70)

    _banner(5, "kv cache: what ASA holds, measured and accounted")
    kv = _kv_cache_step(model, tokenizer, text)
    spec = {}
    if spec_prompts > 0:
        _banner(6, "speculate: SmolLM2-135M with EAGLE-2 and C2T token trees (lossless)")
        spec = _speculative_step(spec_prompts, spec_tokens)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s")
    return {"val_ppl": ev["val_ppl"], "trained_val_ppl": metrics["val_ppl"], "sample": text, "checkpoint": str(ckpt),
            **kv, "spec": spec}


def _speculative_step(n_prompts: int, max_new_tokens: int) -> dict:
    committed = committed_draft("smollm2")
    if committed is None or not all((d / "model.safetensors").exists() for d in committed):
        print("skipped: the committed SmolLM2 draft head or C2T classifier is missing under assets/ (see "
              "assets/README.md for the commands that build them)")
        return {}
    head_dir, clf_dir = committed
    model, tokenizer = load_model_and_tokenizer("smollm2")
    head, meta = EagleDraftHead.load(head_dir, model.config)
    data = ("ShareGPT conversations" if meta.get("sharegpt") else "the target's own replies")
    runs = len(meta.get("history", [])) + 1  # a head continued with --init keeps its earlier runs in "history"
    vocab = (f", drafting over the {len(head.draft_vocab):,} most frequent answer ids"
             if head.draft_vocab is not None else "")
    print(f"target SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters); "
          f"draft head {sum(p.numel() for p in head.parameters()) / 1e6:.1f}M parameters ({head_dir.name}) trained in "
          f"{runs} run{'s' if runs > 1 else ''}, the last on {meta.get('answer_tokens', 0):,} answer tokens of {data}"
          f"{vocab}")
    classifier = C2TClassifier.load(clf_dir)[0]
    strategies = {"eagle2": Eagle2(), "c2t": C2T(classifier)}
    trees = clf_dir / "trees.safetensors"  # the collected trees the classifier was trained on (compact form)
    if trees.exists():
        auto, chosen = sized_strategies(model, head, load_rows(trees)[0], classifier)
        strategies.update(auto)
        print(describe_sizes(chosen))
    prompts = load_prompts("mtbench", n_prompts)
    answers: dict[str, list[list[int]]] = {}
    rows = run_bench(model, tokenizer, head, strategies, {"mtbench": prompts}, max_new_tokens, progress=False,
                     answers=answers)
    print(f"last MT-bench question: {prompts[-1][:100]}")
    print("answer (the same for all): " + tokenizer.decode(answers["mtbench"][-1], skip_special_tokens=True)
          [:300].replace("\n", " ") + " ...")
    plain = next(r for r in rows if r["strategy"] == "none")
    hf = _hf_generate_tokens_per_s(model, tokenizer, prompts, max_new_tokens)
    print(f"plain greedy (leanlm's decoding backend): {plain['tokens_per_s']:.1f} tokens/s; Hugging Face "
          f"model.generate on the same prompts: {hf:.1f} tokens/s")
    result = {"plain_tokens_per_s": plain["tokens_per_s"], "hf_generate_tokens_per_s": hf}
    for r in rows:
        if r["strategy"] == "none":
            continue
        print(f"{r['describe']}: tau+1 {r['tau'] + 1:.2f} tokens per target step, "
              f"{r['candidates_per_step']:.1f} tokens verified per step, {r['tokens_per_s']:.1f} tokens/s = "
              f"{r['speedup']:.2f}x plain; output identical to plain greedy on {r['identical_outputs']}/{len(prompts)}"
              " prompts")
        result[r["strategy"]] = {"tau": r["tau"], "tokens_per_s": r["tokens_per_s"],
                                 "identical": r["identical_outputs"]}
    print("(on this CPU verifying n tokens costs more than one step, so only small trees can pay; on a GPU, where it "
          "costs about one, the cost model grows them. docs/results/speculative.md)")
    return result


def _hf_generate_tokens_per_s(model, tokenizer, prompts: list[str], max_new_tokens: int) -> float:
    """Greedy tokens/s of transformers' own `model.generate` (dynamic cache, eager), decode time after the first
    token as in `run_bench`, so the two figures compare."""
    tokens, seconds = 0, 0.0
    for prompt in prompts:
        ids = torch.tensor([encode_chat(tokenizer, prompt)])
        kw = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
        with torch.no_grad():
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, **kw)  # prefill + first token, subtracted below
            first = time.perf_counter() - t
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=max_new_tokens, **kw)
            seconds += max(1e-9, time.perf_counter() - t - first)
        tokens += out.shape[1] - ids.shape[1] - 1
    return tokens / seconds


def _kv_cache_step(model, tokenizer, text: str) -> dict:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    n, dtype_bytes = ids.shape[1], next(model.parameters()).element_size()
    measured, accounted = cache.nbytes(), cache_bytes(model.config, n, dtype_bytes)
    print(f"after {n} tokens the cache holds {measured:,} bytes; the accounting says {accounted:,} "
          f"({'exact' if measured == accounted else 'MISMATCH'})")
    rows = {r["variant"]: r for r in kv_report(model.config, [8192, 131072], 2)}
    print("the same model in bf16, bytes per token of context:")
    for name in ("gqa", "nsa", "asa"):
        r = rows[name]
        print(f"  {name}: {r['bytes_per_token'][0]:>7,.0f} @8k  {r['bytes_per_token'][1]:>7,.0f} @128k  "
              f"({r['vs_nsa'][1]:.0%} of NSA @128k)")
    return {"cache_bytes_measured": measured, "cache_bytes_accounted": accounted,
            "asa_vs_nsa_128k": rows["asa"]["vs_nsa"][1]}
