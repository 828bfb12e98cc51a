"""The recipe that turns a target into a trained draft head: data sources into feature caches on disk, a draft
vocabulary, training, and the saved head with what it was trained on. `leanlm spec train-draft` fills a
`DraftRecipe` from its flags and calls `check` (before any work) and `run`.

    data     the target's own greedy answers to training prompts (`prompts`, `mix`; `build_feature_cache`) and/or
             teacher-forced ShareGPT V3 conversations (`sharegpt`, `val_sharegpt`; `build_conversation_cache`),
             each cache resumable shard by shard
    vocab    `draft_vocab` > 0: the N most frequent answer ids of the training data (FR-Spec), else the full one
    train    EAGLE-1's loss (`train_head`; its token term scores the target's own top-1 by default,
             `DraftTrainConfig.cls_target`), held-out accuracy after each epoch (held-out ShareGPT conversations, or
             the last `val_prompts` cached answers), with the agreement with the target's greedy token
    arch     "eagle1" (leanlm's own head, `draft.EagleDraftHead`) or "eagle3" (`eagle3.Eagle3DraftHead`: the target's
             `feature_layers` go into the caches, EAGLE-3's loss, saved as a speculators folder vLLM serves;
             `verifier` is the target's name or path written into it)
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from leanlm.errors import LeanLMError
from leanlm.speculative import sharegpt
from leanlm.speculative.draft import EagleDraftHead, head_config
from leanlm.speculative.eagle3 import Eagle3DraftHead, check_feature_layers, default_feature_layers
from leanlm.speculative.heads import is_head_folder, load_head
from leanlm.speculative.prompts import DRAFT_MIXES, draft_prompts
from leanlm.speculative.train_draft import (DraftTrainConfig, answer_mask, answer_token_counts,
                                            build_conversation_cache, build_feature_cache, coverage, extraction_rate,
                                            load_feature_cache, select_draft_vocab, train_head)


@dataclass
class DraftRecipe:
    target: str
    out: str
    prompts: int = 2000  # prompts the target answers itself (0 = none)
    mix: str = "chat"
    max_new_tokens: int = 128
    batch_size: int = 64  # prompts answered together
    data_dtype: str = "float32"
    data: str | None = None  # answers cache (default OUT-data)
    sharegpt: int = 0  # ShareGPT training conversations (0 = none)
    val_sharegpt: int = 0
    sharegpt_data: str | None = None  # ShareGPT cache (default OUT-sharegpt)
    max_len: int = 1024
    draft_vocab: int = 0  # 0 = full vocabulary
    stage: str = "all"  # all | data | train
    init: str | None = None
    val_prompts: int = 0
    train: DraftTrainConfig | None = None
    save_fp16: bool = False
    overwrite: bool = False
    seed: int = 0
    device: str = "cpu"
    arch: str = "eagle1"  # eagle1 | eagle3
    feature_layers: tuple[int, ...] | None = None  # EAGLE-3: target layers read (default [2, L // 2, L - 3])
    verifier: str | None = None  # EAGLE-3: the target's name/path in the speculators config (default: --target)

    def layers_for(self, config) -> tuple[int, ...] | None:
        """The target layers an EAGLE-3 head reads (checked against the target), None for EAGLE-1."""
        if self.arch != "eagle3":
            return None
        layers = self.feature_layers or default_feature_layers(config.num_hidden_layers)
        return check_feature_layers(layers, config.num_hidden_layers)

    @property
    def answers_dir(self) -> Path:
        out = Path(self.out)
        return Path(self.data) if self.data else out.parent / (out.name + "-data")

    @property
    def sharegpt_dir(self) -> Path:
        out = Path(self.out)
        return Path(self.sharegpt_data) if self.sharegpt_data else out.parent / (out.name + "-sharegpt")

    def check(self) -> None:
        """Every refusal that needs no model, as one LeanLMError naming the flag and the fix."""
        if self.mix not in DRAFT_MIXES:
            raise LeanLMError(f"--mix {self.mix!r} is unknown. Fix: use one of {', '.join(DRAFT_MIXES)}")
        if self.prompts == 0 and self.sharegpt == 0:
            raise LeanLMError("--prompts 0 and --sharegpt 0 leave no training data. Fix: give one of them > 0")
        if self.arch not in ("eagle1", "eagle3"):
            raise LeanLMError(f"--arch {self.arch!r} is unknown. Fix: use eagle1 or eagle3")
        if self.feature_layers is not None and self.arch != "eagle3":
            raise LeanLMError("--feature-layers is for EAGLE-3 heads. Fix: add --arch eagle3 or drop it")
        if self.init is not None and not is_head_folder(self.init):
            raise LeanLMError(f"--init {self.init} is not a draft head folder (no draft_config.json or speculators "
                              "config.json). Fix: pass a folder written by `leanlm spec train-draft`")
        out = Path(self.out)
        if self.stage != "data" and out.exists() and any(out.iterdir()) and not self.overwrite:
            raise LeanLMError(f"output folder {out} exists and is not empty. Fix: choose a new folder or pass "
                              "--overwrite")
        if self.stage == "train" and not any(d.exists() and any(d.glob("shard-*.safetensors"))
                                             for d in (self.answers_dir, self.sharegpt_dir)):
            raise LeanLMError(f"--stage train needs feature shards in {self.answers_dir} or {self.sharegpt_dir}. "
                              "Fix: run --stage data first or pass the --data / --sharegpt-data folders that hold them")
        if self.device not in ("cpu", "cuda") or (self.device == "cuda" and not torch.cuda.is_available()):
            raise LeanLMError(f"--device {self.device!r} is not available here. Fix: use --device cpu, or cuda on a "
                              "machine with a GPU")

    # ------------------------------------------------------------------------------------------------- stages
    def build_data(self, model, tokenizer, say: Callable[[str], None]) -> None:
        """Fill the feature caches (resuming what is there)."""
        model.to(getattr(torch, self.data_dtype))
        layers = self.layers_for(model.config)
        if self.prompts:
            build_feature_cache(model, tokenizer, draft_prompts(self.prompts, self.seed, self.mix), self.answers_dir,
                                self.max_new_tokens, self.batch_size, feature_layers=layers)
        if self.sharegpt:
            tag = f"seed{self.seed}:max_len{self.max_len}"
            counts = {"held-out": self.val_sharegpt} if self.val_sharegpt else {}
            seqs, st = sharegpt.sharegpt_sequences(tokenizer, counts | {"train": self.sharegpt}, self.max_len,
                                                   self.seed)
            tr = st["train"]
            say(f"ShareGPT: {st['records']:,} conversations read, {st['dropped_evaluation']} dropped for quoting an "
                f"evaluation prompt, {st['held_out_pool']:,} held out; training on {tr['used']:,} ({tr['tokens']:,} "
                f"tokens, {tr['answer_tokens']:,} answer tokens)")
            if self.val_sharegpt:  # first: small, and what every epoch is scored on
                build_conversation_cache(model, seqs["held-out"], self.sharegpt_dir / "held-out",
                                         source=f"sharegpt-v3:held-out:{tag}", feature_layers=layers)
            build_conversation_cache(model, seqs["train"], self.sharegpt_dir, source=f"sharegpt-v3:train:{tag}",
                                     feature_layers=layers)
            rate = extraction_rate(self.sharegpt_dir)
            say(f"feature extraction: {rate['tokens']:,} tokens in {rate['seconds']:.0f}s "
                f"({rate['tokens_per_s']:.0f} tokens/s)")
        model.to(torch.float32)

    def load_data(self) -> tuple[list, list | None]:
        """(training sequences, held-out sequences or None) from the caches."""
        data = load_feature_cache(self.answers_dir) if self.prompts and self.answers_dir.exists() else []
        if self.sharegpt and self.sharegpt_dir.exists():
            # the first --sharegpt conversations: a cache grown for more (same split, same order) holds them first
            meta = self.sharegpt_dir / "meta.json"
            size = json.loads(meta.read_text()).get("shard_size") if meta.exists() else None
            shards = -(-self.sharegpt // size) if size else None  # read no shard past them
            data += load_feature_cache(self.sharegpt_dir, shards)[: self.sharegpt]
        held_dir = self.sharegpt_dir / "held-out"
        if self.sharegpt and self.val_sharegpt and held_dir.exists():
            return data, load_feature_cache(held_dir)
        if not 0 <= self.val_prompts < len(data):
            raise LeanLMError(f"--val-prompts {self.val_prompts} must be >= 0 and leave training data ({len(data)} "
                              f"sequences in the cache). Fix: e.g. --val-prompts {min(64, len(data) // 10)}")
        if not self.val_prompts:
            return data, None
        return data[: len(data) - self.val_prompts], data[len(data) - self.val_prompts:]

    def new_head(self, config, vocab: torch.Tensor | None, lm_head) -> EagleDraftHead | Eagle3DraftHead:
        """A fresh head of `arch` for the target (an EAGLE-3 head starts its LM head from the target's rows)."""
        if self.arch == "eagle3":
            return Eagle3DraftHead(head_config(config), self.layers_for(config), vocab).init_from_target(lm_head)
        return EagleDraftHead(head_config(config), vocab)

    def run(self, model, tokenizer, say: Callable[[str], None] = print) -> EagleDraftHead | Eagle3DraftHead | None:
        """Build the data (stage all/data), then train and save the head (stage all/train); returns the head."""
        t = time.perf_counter()
        torch.manual_seed(self.seed)
        if self.stage in ("all", "data"):
            self.build_data(model, tokenizer, say)
        train, val = self.load_data()
        answers = sum(int(answer_mask(d).sum()) for d in train)
        say(f"draft data: {len(train)} sequences, {sum(len(d[0]) for d in train):,} tokens ({answers:,} answer "
            f"tokens) ({time.perf_counter() - t:.0f}s)")
        if self.stage == "data":
            return None
        counts = answer_token_counts(train, model.config.vocab_size)
        vocab = select_draft_vocab(counts, self.draft_vocab) if self.draft_vocab else None
        if vocab is not None:
            held = f", held-out {coverage(answer_token_counts(val, model.config.vocab_size), vocab):.3f}" if val else ""
            say(f"draft vocabulary: the {len(vocab):,} most frequent answer ids cover {coverage(counts, vocab):.3f} of "
                f"the training answer tokens{held}")
        history: list = []
        if self.init is not None:  # continue training a head (over the new draft vocabulary, if one is asked for)
            init, init_meta = load_head(self.init, model.config)
            if init.arch != self.arch:
                raise LeanLMError(f"--init {self.init} is an {init.arch} head, --arch is {self.arch}. Fix: pass "
                                  f"--arch {init.arch}")
            if self.arch == "eagle3" and init.feature_layers != self.layers_for(model.config):
                raise LeanLMError(f"--init {self.init} reads target layers {list(init.feature_layers)}, the data "
                                  f"{list(self.layers_for(model.config))}. Fix: pass --feature-layers "
                                  + ",".join(map(str, init.feature_layers)))
            init_meta = init_meta.get("leanlm", init_meta)
            history = init_meta.get("history", []) + [{k: init_meta.get(k) for k in ("command", "steps",
                                                                                      "final_train")}]
            head = self.new_head(model.config, vocab if vocab is not None else init.draft_vocab,
                                 model.get_output_embeddings())
            if vocab is None and head.draft_vocab is not None:
                say(f"draft vocabulary: the --init head's {len(head.draft_vocab):,} ids cover "
                    f"{coverage(counts, head.draft_vocab.cpu()):.3f} of the training answer tokens")
            skip = ("draft_vocab", "d2t", "t2d", "lm_head.weight")  # the vocabulary (and its LM-head rows) may change
            head.load_state_dict({k: v for k, v in init.state_dict().items() if k not in skip}, strict=False)
        else:
            head = self.new_head(model.config, vocab, model.get_output_embeddings())
        head.to(self.device)
        cfg = self.train or DraftTrainConfig(seed=self.seed, max_len=self.max_len)
        logs = train_head(head, model.get_input_embeddings(), model.get_output_embeddings(), train, cfg,
                          val_data=val)
        last = logs[-1]
        val_log = [lg["val"] for lg in logs if "val" in lg]
        meta = {k: v for k, v in asdict(self).items() if k != "train"} | {
            "train": asdict(cfg), "epochs": cfg.epochs, "lr": cfg.lr, "cls_weight": cfg.cls_weight,
            "sequences": len(train), "answer_tokens": answers, "steps": len(logs),
            "final_train": last, "history": history, "val_by_epoch": val_log,
            # over the ids the head drafts: the new vocabulary, or the one kept from --init
            "draft_vocab_coverage": coverage(counts, head.draft_vocab.cpu() if head.draft_vocab is not None else None),
            "command": "leanlm spec train-draft " + " ".join(sys.argv[3:] if len(sys.argv) > 3 else [])}
        dtype = torch.float16 if self.save_fp16 else None
        if self.arch == "eagle3":
            head.save(self.out, verifier=self.verifier or self.target,
                      verifier_architectures=list(getattr(model.config, "architectures", None) or []), meta=meta,
                      dtype=dtype)
        else:
            head.save(self.out, meta=meta, dtype=dtype)
        held = f", held-out {val_log[-1]['acc']:.3f}" if val_log else ""
        if val_log and "acc_greedy" in val_log[-1]:
            held += f" (the target's greedy token: {val_log[-1]['acc_greedy']:.3f})"
        loss = f"feature loss {last['reg']:.4f}" if "reg" in last else f"KL {last['kl']:.4f}"
        say(f"draft head saved to {self.out}: {len(logs)} steps, final training next-token accuracy {last['acc']:.3f}"
            f"{held}, {loss}")
        return head
