"""The `leanlm` command: one subcommand per job.

    leanlm train CONFIG [--set section.key=value ...]
    leanlm eval CHECKPOINT [--batches N] [--tasks hellaswag,piqa,... --limit N --out FILE.json]
    leanlm generate CHECKPOINT --prompt TEXT [--max-new-tokens N --temperature T --top-k K --seed S]
                    [--chat | --no-chat] [--device cpu|cuda|auto]
                    [--spec chain|static|eagle2|c2t --draft HEAD --classifier C2T --beta B]
    leanlm wisca CHECKPOINT OUT [--qk tensor --vo tensor --norm l1 --ffn]
    leanlm spec train-draft TARGET --out DIR [--prompts N --max-new-tokens N --epochs E --stage all|data|train]
    leanlm spec bench TARGET --draft HEAD [--prompts mtbench,gsm8k,humaneval --strategies chain,eagle2,c2t:beta=0.5]
    leanlm spec c2t-collect TARGET --draft HEAD --out FILE [--prompts N --top-k 10 --depth 10]
    leanlm spec c2t-train FILE --out DIR [--neg-ratio R --epochs E]
    leanlm kv-report CONFIG [--context 8k,32k,128k]
    leanlm demo [--out DIR --steps N]

Bad input (config values, checkpoints, corpora) is reported as one line naming the field and the fix, with exit
status 2, before any work starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from leanlm.errors import LeanLMError
from leanlm.speculative.c2t_config import C2TTrainConfig


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_train(args: argparse.Namespace) -> int:
    from leanlm.runconfig import load_run_config
    from leanlm.train import Trainer

    run = load_run_config(args.config, args.set)
    trainer = Trainer(run)  # with the run config's callbacks (WISCA when its section is on)
    try:
        metrics = trainer.fit()
    finally:
        trainer.close()
    if trainer.rank == 0:
        print(f"final: val_loss {metrics['val_loss']:.4f}  val_ppl {metrics['val_ppl']:.2f}  "
              f"checkpoint {trainer.last_checkpoint}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from leanlm.inference import checked_device, load_model_and_tokenizer

    path = Path(args.checkpoint)
    if args.tasks:
        from leanlm.evals.suite import markdown_table, parse_tasks, run_suite, write_results

        tasks = parse_tasks(args.tasks)  # validate before loading anything
        model, tokenizer = load_model_and_tokenizer(str(path), device=checked_device(args.device))
        results = run_suite(model, tokenizer, tasks, args.limit, batch_size=args.batch_size)
        print(markdown_table(results))
        if args.out:
            write_results(results, Path(args.out), {"model": str(path), "limit": args.limit, "tasks": tasks})
            print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
        return 0
    from leanlm.checkpoint import read_json_object
    from leanlm.evals.perplexity import validation_perplexity

    model, tokenizer = load_model_and_tokenizer(str(path), device=checked_device(args.device))
    run_file = path / "run_config.json"
    if not run_file.exists():
        raise LeanLMError(f"{path} has no run_config.json, so its validation split is unknown. Fix: pass a "
                          f"checkpoint written by `leanlm train`")
    run_config = read_json_object(run_file, "run config", "pass a checkpoint written by `leanlm train`",
                                  required=("data",))
    metrics = validation_perplexity(model, run_config, args.batches, tokenizer=tokenizer)
    print(json.dumps(metrics))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise LeanLMError("--prompt is empty. Fix: give some text to continue, e.g. --prompt 'Once upon a time'")
    if args.spec != "none" and (not args.draft or (args.spec == "c2t" and not args.classifier)):
        from leanlm.pretrained import committed_draft

        committed = committed_draft(args.checkpoint)
        if committed is not None:  # the bundled model has a head (and classifier) committed under assets/
            args.draft = args.draft or str(committed[0])
            if args.spec == "c2t":
                args.classifier = args.classifier or str(committed[1])
            print(f"note: --spec {args.spec} with the committed draft head {args.draft}"
                  + (f" and classifier {args.classifier}" if args.spec == "c2t" else ""), file=sys.stderr)
    if args.spec != "none" and not args.draft:
        raise LeanLMError(f"--spec {args.spec} needs a draft head. Fix: pass --draft PATH (a folder written by "
                          "`leanlm spec train-draft`, or a speculators EAGLE-3 folder), or --spec none")
    if args.spec == "c2t" and not args.classifier:
        raise LeanLMError("--spec c2t needs a classifier. Fix: pass --classifier DIR (written by "
                          "`leanlm spec c2t-train`)")
    from leanlm.inference import check_prompt, checked_device, generate_text, load_model_and_tokenizer, use_chat

    head = strategy = None
    if args.spec != "none":
        from leanlm.speculative.heads import load_head
        from leanlm.speculative.strategies import make_strategy

        kw = {"classifier": args.classifier, "beta": args.beta} if args.spec == "c2t" else {}
        try:  # unknown names and bad files fail here, before loading a model
            strategy = make_strategy(args.spec, **kw)
        except ValueError as exc:
            raise LeanLMError(f"--spec {args.spec}: {exc}. Fix: see `leanlm generate --help`") from None
    model, tokenizer = load_model_and_tokenizer(args.checkpoint, device=checked_device(args.device))
    if args.spec != "none":
        head, _ = load_head(args.draft, model.config)
    chat = use_chat(tokenizer, args.chat)
    check_prompt(model, tokenizer, args.prompt, args.max_new_tokens, chat)
    generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                  chat=chat, compile=args.compile, head=head, strategy=strategy)
    return 0


def cmd_spec_train_draft(args: argparse.Namespace) -> int:
    """Draft data into feature caches on disk, an EAGLE head trained on it, saved atomically (see
    `leanlm.speculative.draft_recipe`)."""
    from leanlm.inference import load_model_and_tokenizer
    from leanlm.speculative.draft_recipe import DraftRecipe
    from leanlm.speculative.train_draft import DraftTrainConfig

    train = DraftTrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, bf16=args.bf16,
                             batch_tokens=args.batch_tokens, max_context=args.max_context, cls_weight=args.cls_weight,
                             cls_target=args.cls_target,
                             max_len=args.max_len, ttt_weight=args.ttt_weight,
                             ttt_steps=args.ttt_steps if args.ttt_steps is not None else
                             (2 if args.arch == "eagle3" else 0))
    recipe = DraftRecipe(
        target=args.target, out=args.out, prompts=args.prompts, mix=args.mix, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, data_dtype=args.data_dtype, data=args.data, sharegpt=args.sharegpt,
        val_sharegpt=args.val_sharegpt, sharegpt_data=args.sharegpt_data, max_len=args.max_len,
        draft_vocab=args.draft_vocab, stage=args.stage, init=args.init, val_prompts=args.val_prompts, train=train,
        save_fp16=args.save_fp16, overwrite=args.overwrite, seed=args.seed, device=args.device, arch=args.arch,
        feature_layers=args.feature_layers, verifier=args.verifier)
    recipe.check()  # before loading anything
    model, tokenizer = load_model_and_tokenizer(args.target, device=args.device)
    recipe.run(model, tokenizer)
    return 0


def cmd_spec_bench(args: argparse.Namespace) -> int:
    """Speculative decoding vs plain decoding on held-out prompt sets (table, JSON, plot)."""
    from leanlm.inference import check_fits_context, checked_device, load_model_and_tokenizer
    from leanlm.checkpoint import atomic_write_text
    from leanlm.speculative.bench import markdown, run_bench
    from leanlm.speculative.heads import load_head
    from leanlm.speculative.eval_sets import EVAL_SETS, load_eval_prompts
    from leanlm.speculative.strategies import parse_strategy

    sets = [s.strip() for s in args.prompts.split(",") if s.strip()]
    bad = [s for s in sets if s not in EVAL_SETS]
    if bad or not sets:
        raise LeanLMError(f"--prompts: unknown set(s) {bad}. Fix: use some of {', '.join(EVAL_SETS)}")
    specs = [x for x in args.strategies.split(",") if x.strip()]
    if any(x.split(":")[0] == "c2t" for x in specs) and not args.classifier:
        raise LeanLMError("--strategies c2t needs a classifier. Fix: pass --classifier DIR")
    try:
        strategies = {x: parse_strategy(x, classifier=args.classifier) for x in specs}
    except (ValueError, TypeError) as e:
        raise LeanLMError(f"--strategies: {e}. Fix: e.g. --strategies chain,eagle2:total_tokens=30,c2t:beta=0.5")
    from leanlm.speculative.prompts import encode_chat

    trees, chosen, journal = None, None, None
    if args.size_from:
        from leanlm.speculative.c2t_train import load_rows

        trees, _ = load_rows(args.size_from)  # checked before any model is loaded
    if args.out:  # per-prompt records, appended as prompts finish; a rerun with the same arguments resumes
        from leanlm.speculative.bench import BenchJournal, weights_digest

        signature = {k: getattr(args, k) for k in ("target", "draft", "strategies", "classifier", "size_from",
                                                    "max_new_tokens", "compile", "device")}
        signature |= {"draft_weights": weights_digest(args.draft), "classifier_weights": weights_digest(
            args.classifier), "target_weights": weights_digest(args.target)}
        legacy = {f"{k}_weights": (lambda f=getattr(args, k): weights_digest(f, legacy=True))
                  for k in ("draft", "classifier", "target")}  # journals from before the manifest digest
        journal = BenchJournal(Path(args.out).with_suffix(".jsonl"), signature, legacy)  # another run's: refused
        journal.lock()
    model, tokenizer = load_model_and_tokenizer(args.target, device=checked_device(args.device))
    head, _ = load_head(args.draft, model.config)
    head.to(model.device)
    from leanlm.speculative.target import make_target

    target = make_target(model, args.compile)  # sizes are measured on the backend that decodes (compiled or not)
    if trees is not None:
        from leanlm.speculative.bench import describe_sizes, sized_strategies
        from leanlm.speculative.c2t import C2TClassifier

        clf = C2TClassifier.load(args.classifier)[0] if args.classifier else None
        if journal is not None and journal.sizes is not None:  # a resumed run decodes with the first start's sizes
            from leanlm.speculative.bench import strategies_for_sizes

            chosen = journal.sizes
            auto = strategies_for_sizes(chosen, clf)
            print(f"tree sizes from the first start of this run ({journal.path}):")
        else:
            auto, chosen = sized_strategies(target, head, trees, clf)
        strategies.update(auto)
        print(describe_sizes(chosen))
    prompt_sets = {s: load_eval_prompts(s, args.limit) for s in sets}
    for name, prompts in prompt_sets.items():  # every prompt must fit before any decoding starts
        for i, prompt in enumerate(prompts):
            check_fits_context(model, len(encode_chat(tokenizer, prompt)), args.max_new_tokens,
                               f"prompt {i} of {name}")
    resumed = 0
    if journal is not None:
        journal.start(chosen)
        resumed = sum(journal.done(n, i, p) is not None for n, ps in prompt_sets.items() for i, p in enumerate(ps))
        if resumed:
            print(f"resuming {journal.path}: {resumed} of {sum(map(len, prompt_sets.values()))} prompts already "
                  f"decoded")
    try:
        rows = run_bench(target, tokenizer, head, strategies, prompt_sets, args.max_new_tokens, journal=journal)
    finally:
        if journal is not None:
            journal.close()
    table = markdown(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps({"args": vars(args) | {"func": None}, "rows": rows, "sizes": chosen,
                                           "resumed_prompts": resumed}, indent=1, default=str))
        atomic_write_text(out.with_suffix(".md"), table + "\n")
        from leanlm.plots import bar_chart

        bar_chart(out.with_suffix(".png"), rows)
    return 0


def cmd_spec_c2t_collect(args: argparse.Namespace) -> int:
    """Full EAGLE-2 trees on training prompts, every node verified; features + labels to one file."""
    from leanlm.inference import checked_device, load_model_and_tokenizer
    from leanlm.speculative.c2t_train import collect_trees, save_rows
    from leanlm.speculative.heads import load_head
    from leanlm.speculative.prompts import draft_prompts, encode_chat

    if not str(args.out).endswith(".safetensors"):
        raise LeanLMError(f"--out {args.out} must end in .safetensors. Fix: e.g. --out .cache/c2t/trees.safetensors")
    model, tokenizer = load_model_and_tokenizer(args.target, device=checked_device(args.device))
    head, _ = load_head(args.draft, model.config)
    head.to(model.device)
    import torch

    prompts = [torch.tensor([encode_chat(tokenizer, p)]) for p in draft_prompts(args.prompts, args.seed)]
    rows, st = collect_trees(model, head, prompts, args.max_new_tokens, args.top_k, args.depth,
                             args.entropy_top or None, tokenizer.eos_token_id)
    meta = {"target": args.target, "draft": args.draft, "prompts": args.prompts, "seed": args.seed,
            "max_new_tokens": args.max_new_tokens, "top_k": args.top_k, "depth": args.depth,
            "entropy_top": args.entropy_top, "trees": st.trees, "positives": st.positives,
            "command": "leanlm spec c2t-collect " + " ".join(sys.argv[3:] if len(sys.argv) > 3 else [])}
    save_rows(rows, args.out, meta, compact=args.compact)
    print(f"{st.trees} trees, {st.nodes:,} nodes verified, {st.positives} accepted ({st.positives / max(1, st.trees):.2f}"
          f" per tree) in {st.seconds:.0f}s -> {args.out}")
    return 0


def cmd_spec_c2t_train(args: argparse.Namespace) -> int:
    from leanlm.speculative.c2t_train import C2TTrainConfig, load_rows, train_classifier

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise LeanLMError(f"output folder {out} exists and is not empty. Fix: choose a new folder or pass --overwrite")
    rows, meta = load_rows(args.data)
    cfg = C2TTrainConfig(hidden=args.hidden, feature_scaling=args.feature_scaling,
                         entropy_top=meta.get("entropy_top", 1000) or None, neg_ratio=args.neg_ratio,
                         epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, val_fraction=args.val_fraction,
                         beta=args.beta, seed=args.seed)
    clf, logs = train_classifier(rows, cfg)
    chosen = [m for m in logs if m.get("chosen")][-1]
    for m in logs:
        print(f"epoch {m['epoch']}: bce {m['train_bce']:.4f}  held-out precision {m['precision']:.3f} recall "
              f"{m['recall']:.3f} AUC {m['auc']:.3f} positive rate {m['positive_rate']:.4f}"
              + ("  *" if m is chosen else ""))
    clf.save(out, meta={"train": vars(cfg), "data": str(args.data), "data_meta": meta, "epochs_log": logs,
                        "chosen": chosen,
                        "command": "leanlm spec c2t-train " + " ".join(sys.argv[3:] if len(sys.argv) > 3 else [])})
    print(f"classifier saved to {out} (epoch {chosen['epoch']}: recall {chosen['recall']:.3f}, precision "
          f"{chosen['precision']:.3f}, AUC {chosen['auc']:.3f} at beta {args.beta})")
    return 0


def cmd_wisca(args: argparse.Namespace) -> int:
    import shutil

    from leanlm.checkpoint import write_folder_atomically
    from leanlm.inference import load_model_and_tokenizer
    from leanlm.wisca import WiscaConfig, wisca_transform

    cfg = WiscaConfig(qk=args.qk, vo=args.vo, norm=args.norm, ffn=args.ffn, rope_pairs=args.rope_pairs)
    cfg.check()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise LeanLMError(f"output folder {out} exists and is not empty. Fix: choose a new folder or pass --overwrite")
    model, tokenizer = load_model_and_tokenizer(args.checkpoint)
    report = wisca_transform(model, cfg)
    print(report.table())
    if not report.layers:
        raise LeanLMError(f"no attention layer of {args.checkpoint} could be rescaled (see 'unsupported' above)")

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if (Path(args.checkpoint) / "run_config.json").exists():
            shutil.copy(Path(args.checkpoint) / "run_config.json", tmp / "run_config.json")

    write_folder_atomically(out, write)
    print(f"wrote {out} ({len(report.layers)} attention layers rescaled in {report.seconds * 1000:.1f} ms)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from leanlm.demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps)
    return 0


def cmd_kv_report(args: argparse.Namespace) -> int:
    from leanlm.config import LeanLMConfig
    from leanlm.errors import CheckpointError, ConfigError
    from leanlm.kvreport import format_report, kv_report, parse_contexts
    from leanlm.runconfig import load_run_config

    try:
        contexts = parse_contexts(args.context)
    except ValueError as exc:
        raise ConfigError("--context", str(exc), "pass comma-separated lengths like 8k,32k,128k") from None
    path = Path(args.config)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} has no config.json; pass a run config (YAML) or a saved model folder")
        config = LeanLMConfig.from_pretrained(path)
    else:
        config = load_run_config(args.config, args.set).model_config()
    rows = kv_report(config, contexts, args.dtype_bytes)
    print(format_report(rows, config, args.dtype_bytes))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line (`leanlm CMD: error: ...`, exit 2), like leanlm's own errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}. Fix: see `{self.prog} --help`\n")


def _number(kind: type, test, wanted: str):
    """An argparse `type` that parses `kind` and accepts it when `test(value)` holds (finite numbers only)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
        if (kind is float and not math.isfinite(value)) or not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value

    parse.__name__ = wanted  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v > 0, "an integer > 0")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
seed_int = _number(int, lambda v: 0 <= v < 2**32, "a seed in [0, 2**32)")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
non_negative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
unit_interval = _number(float, lambda v: 0 < v < 1, "a number in (0, 1)")


def layer_ids(text: str) -> tuple[int, ...]:
    """An argparse `type`: comma-separated distinct layer ids >= 0 (checked against the target once it is loaded)."""
    try:
        ids = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated layer ids, e.g. 2,15,27") from None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"{text!r} must be distinct layer ids >= 0, e.g. 2,15,27")
    return ids


layer_ids.__name__ = "layer ids"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="leanlm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("config", help="YAML path or shipped config name (tiny, small, 125m, 350m)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=3e-4 (repeatable)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="validation perplexity of a checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("--batches", type=positive_int, default=50, help="validation batches of 8 sequences (default 50)")
    e.add_argument("--tasks", default=None, help="zero-shot tasks instead of validation perplexity, comma-separated "
                   "(hellaswag, piqa, arc_easy, arc_challenge, boolq, winogrande, openbookqa, sciq, copa, lambada, "
                   "boolq-passages, or all)")
    e.add_argument("--limit", type=positive_int, default=None, help="first N documents of each task (default: all)")
    e.add_argument("--batch-size", type=positive_int, default=16)
    e.add_argument("--out", default=None, help="write results as JSON (and a .md table beside it)")
    e.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text from a prompt (streamed)")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=positive_int, default=100)
    g.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=non_negative_int, default=50)
    g.add_argument("--seed", type=seed_int, default=0)
    g.add_argument("--spec", default="none", choices=("none", "chain", "static", "eagle2", "c2t"),
                   help="speculative decoding strategy (lossless; needs --draft)")
    g.add_argument("--draft", default=None, help="draft head folder for --spec (smollm2: the committed head)")
    g.add_argument("--classifier", default=None, help="C2T classifier folder for --spec c2t (smollm2: the committed one)")
    g.add_argument("--beta", type=unit_interval, default=0.5, help="C2T confidence threshold")
    g.add_argument("--device", default="cpu", help="cpu, cuda or auto (the draft head follows the model)")
    g.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile the decoding steps: auto (on with a GPU), on, off; on a CPU a graph takes about a minute "
                   "to compile the first time (cached on disk under .cache/inductor)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="the prompt as a user turn of the tokenizer's chat template (default when the model has one; "
                   "--no-chat: raw completion)")
    g.set_defaults(func=cmd_generate)

    w = sub.add_parser("wisca", help="apply one WISCA transition to a saved model (leanlm or HF) and save it")
    w.add_argument("checkpoint")
    w.add_argument("out")
    w.add_argument("--qk", default="tensor", help="tensor | group | channel | none")
    w.add_argument("--vo", default="tensor", help="tensor | group | channel | none")
    w.add_argument("--norm", default="l1", help="l1 | l2")
    w.add_argument("--ffn", action="store_true", help="also balance SwiGLU up/down (extension beyond the paper)")
    w.add_argument("--rope-pairs", default="half", help="half (HF rotate_half) | interleaved")
    w.add_argument("--overwrite", action="store_true")
    w.set_defaults(func=cmd_wisca)

    sp = sub.add_parser("spec", help="speculative decoding: train a draft head")
    ssub = sp.add_subparsers(dest="spec_command", required=True)
    td = ssub.add_parser("train-draft", help="train an EAGLE draft head on the target's own answers")
    td.add_argument("target", help="smollm2, a local HF model folder or a leanlm checkpoint")
    td.add_argument("--out", required=True, help="folder for the head (eagle1: draft_config.json + "
                    "model.safetensors; eagle3: a speculators folder, config.json + model.safetensors)")
    td.add_argument("--prompts", type=non_negative_int, default=2000,
                    help="prompts the target answers itself (0 = none; see --mix)")
    td.add_argument("--sharegpt", type=non_negative_int, default=0,
                    help="ShareGPT V3 conversations of the training split, teacher-forced (EAGLE's data; 0 = none)")
    td.add_argument("--val-sharegpt", type=non_negative_int, default=0,
                    help="held-out ShareGPT conversations scored after each epoch (teacher-forced accuracy)")
    td.add_argument("--sharegpt-data", default=None, help="feature cache folder of the ShareGPT conversations "
                    "(default: OUT-sharegpt beside --out); resumed shard by shard")
    td.add_argument("--max-len", type=positive_int, default=1024, help="tokens kept per conversation / sequence")
    td.add_argument("--arch", choices=("eagle1", "eagle3"), default="eagle1",
                    help="eagle1: leanlm's head over the target's last hidden state; eagle3: EAGLE-3's head over "
                    "several target layers, saved as a speculators folder that vLLM serves")
    td.add_argument("--feature-layers", type=layer_ids, default=None,
                    help="EAGLE-3: target layers read, comma-separated ids (k = output of layer k-1, as speculators' "
                    "eagle_aux_hidden_state_layer_ids; default 2,L/2,L-3)")
    td.add_argument("--verifier", default=None, help="EAGLE-3: the target's name or path written into the "
                    "speculators config, as vLLM should find it (default: TARGET)")
    td.add_argument("--ttt-steps", type=non_negative_int, default=None,
                    help="EAGLE-3's training-time test: extra steps where the head reads its own predicted features, "
                    "with the attention of drafting at that depth (default 0 for eagle1 = teacher forcing only, "
                    "2 for eagle3 = 3 steps as speculators)")
    td.add_argument("--ttt-weight", type=non_negative_float, default=1.0, help="loss weight of each extra step")
    td.add_argument("--draft-vocab", type=non_negative_int, default=0,
                    help="draft over the N most frequent answer ids only (FR-Spec / EAGLE-3; 0 = full vocabulary)")
    td.add_argument("--max-new-tokens", type=positive_int, default=128)
    td.add_argument("--epochs", type=positive_int, default=2)
    td.add_argument("--lr", type=positive_float, default=1e-3)
    td.add_argument("--batch-tokens", type=positive_int, default=4096, help="answer tokens per optimizer step")
    td.add_argument("--mix", default="chat", help="prompts the target answers: chat (MT-bench-like mix) or "
                    "questions")
    td.add_argument("--data", default=None, help="feature cache folder (default: OUT-data beside --out); reused "
                    "and resumed when its settings match")
    td.add_argument("--stage", choices=("all", "data", "train"), default="all",
                    help="data: only build the feature cache; train: only train on the shards already there")
    td.add_argument("--batch-size", type=positive_int, default=64, help="prompts answered together")
    td.add_argument("--data-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="target dtype while answering (bfloat16 is ~2x faster on CPUs with AVX512-BF16)")
    td.add_argument("--bf16", action="store_true", help="train the head under bfloat16 autocast (GPU)")
    td.add_argument("--max-context", type=positive_int, default=None,
                    help="train on at most this many prompt tokens before each answer (saves compute)")
    td.add_argument("--save-fp16", action="store_true", help="store the weights as float16 (half the file size)")
    td.add_argument("--init", default=None, help="start from this trained head (continue training) instead of a "
                    "fresh one")
    td.add_argument("--cls-weight", type=non_negative_float, default=0.1,
                    help="weight of the next-token cross-entropy beside the feature regression (EAGLE: 0.1)")
    td.add_argument("--cls-target", choices=("target", "greedy", "data"), default="greedy",  # train_draft.CLS_TARGETS
                    help="eagle1: what the token loss scores against: target = KL to the target's own next-token "
                    "distribution (distillation, as EAGLE's code), greedy = cross-entropy against the target's top-1, "
                    "data = cross-entropy against the data's next token (which ShareGPT's target did not write)")
    td.add_argument("--device", default="cpu", help="cpu or cuda: where the target answers and the head trains")
    td.add_argument("--val-prompts", type=non_negative_int, default=0,
                    help="hold out the last N cached sequences; report their teacher-forced next-token accuracy "
                    "after each epoch (the head overfits small caches: watch this, not the training accuracy)")
    td.add_argument("--seed", type=seed_int, default=0)
    td.add_argument("--overwrite", action="store_true")
    td.set_defaults(func=cmd_spec_train_draft)

    sb = ssub.add_parser("bench", help="speculative vs plain decoding on MT-bench / GSM8K / HumanEval prompts")
    sb.add_argument("target", help="smollm2, a local HF model folder or a leanlm checkpoint")
    sb.add_argument("--draft", required=True)
    sb.add_argument("--prompts", default="mtbench,gsm8k,humaneval",
                    help="comma-separated sets: mtbench, gsm8k, humaneval, sharegpt (held-out ShareGPT first turns)")
    sb.add_argument("--limit", type=positive_int, default=None, help="first N prompts of each set")
    sb.add_argument("--strategies", default="chain,static,eagle2",
                    help="comma-separated; each NAME or NAME:key=value:..., e.g. eagle2:total_tokens=30,c2t:beta=0.5")
    sb.add_argument("--classifier", default=None, help="C2T classifier folder for c2t strategies")
    sb.add_argument("--size-from", default=None, help="trees from `spec c2t-collect`: measure this machine's step "
                    "costs and add eagle2:auto (total_tokens/depth) and, with --classifier, c2t:auto (beta) sized "
                    "for it; the chosen sizes are printed")
    sb.add_argument("--max-new-tokens", type=positive_int, default=128)
    sb.add_argument("--out", default=None, help="JSON path (a .md table and a .png plot are written beside it); "
                    "each prompt's record is appended to OUT.jsonl as it finishes, and a rerun with the same "
                    "arguments resumes where a stopped run left off (a larger --limit adds prompts)")
    sb.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    sb.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                    help="torch.compile the decoding steps: auto (on with a GPU), on, off; on a CPU a graph takes about a minute "
                   "to compile the first time (cached on disk under .cache/inductor)")
    sb.set_defaults(func=cmd_spec_bench)

    cc = ssub.add_parser("c2t-collect", help="grow full EAGLE-2 trees, verify every node, store C2T features + labels")
    cc.add_argument("target", help="smollm2, a local HF model folder or a leanlm checkpoint")
    cc.add_argument("--draft", required=True, help="draft head folder")
    cc.add_argument("--out", required=True, help="output .safetensors file")
    cc.add_argument("--prompts", type=positive_int, default=40, help="training prompts answered (never the evaluation sets)")
    cc.add_argument("--max-new-tokens", type=positive_int, default=64)
    cc.add_argument("--top-k", type=positive_int, default=10)
    cc.add_argument("--depth", type=positive_int, default=10)
    cc.add_argument("--entropy-top", type=non_negative_int, default=1000, help="M of the top-M entropy (0 = whole vocabulary)")
    cc.add_argument("--seed", type=seed_int, default=1)
    cc.add_argument("--compact", action="store_true", help="16-bit indices, float16 entropy (about 2/5 of the size; "
                    "for a file that is committed beside a classifier)")
    cc.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    cc.set_defaults(func=cmd_spec_c2t_collect)

    ct = ssub.add_parser("c2t-train", help="train the C2T classifier (BCE, negative sampling, held-out split)")
    ct.add_argument("data", help="a file written by c2t-collect")
    ct.add_argument("--out", required=True, help="classifier folder")
    c2t = C2TTrainConfig()  # the defaults of the Python API, so both read one source
    ct.add_argument("--neg-ratio", type=non_negative_float, default=c2t.neg_ratio,
                    help=f"negatives per positive per epoch (0 = all; default {c2t.neg_ratio})")
    ct.add_argument("--epochs", type=positive_int, default=c2t.epochs, help=f"default {c2t.epochs}: the paper's 10 are "
                    "for ~9M rows; a CPU-sized collection (~100k rows) needs more passes")
    ct.add_argument("--lr", type=positive_float, default=c2t.lr, help=f"default {c2t.lr}")
    ct.add_argument("--batch-size", type=positive_int, default=c2t.batch_size, help=f"default {c2t.batch_size}")
    ct.add_argument("--hidden", type=positive_int, default=c2t.hidden, help=f"default {c2t.hidden}")
    ct.add_argument("--feature-scaling", choices=("raw", "log"), default=c2t.feature_scaling,
                    help=f"log (log P, measured better) or raw (P linear, the paper's reading); default "
                    f"{c2t.feature_scaling}")
    ct.add_argument("--beta", type=unit_interval, default=c2t.beta,
                    help=f"threshold for the reported precision/recall (default {c2t.beta})")
    ct.add_argument("--val-fraction", type=unit_interval, default=c2t.val_fraction,
                    help=f"default {c2t.val_fraction}")
    ct.add_argument("--seed", type=seed_int, default=c2t.seed)
    ct.add_argument("--overwrite", action="store_true")
    ct.set_defaults(func=cmd_spec_c2t_train)

    k = sub.add_parser("kv-report", help="KV-cache bytes per token and per sequence, against GQA/MLA/GLA/NSA/ASA")
    k.add_argument("config", help="run config (YAML path or shipped name) or a saved model folder")
    k.add_argument("--context", default="8k,32k,128k", help="context lengths, e.g. 8k,32k,128k")
    k.add_argument("--dtype-bytes", type=int, default=2, choices=(1, 2, 4), help="bytes per cached number (2 = bf16)")
    k.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set model.nsa_window=1024")
    k.add_argument("--json", default=None, help="also write the rows as JSON")
    k.set_defaults(func=cmd_kv_report)

    d = sub.add_parser("demo", help="the guided tour: train, evaluate and sample a tiny model on 2 CPU cores")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the tiny config's)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    _offline()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argument error (2, already printed as one line)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except LeanLMError as exc:
        print(f"leanlm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
