"""`leanlm generate` as people expect: the chat template by default when the model has one (`--no-chat` for raw
completion), and the committed draft head / classifier for the bundled `smollm2` when `--spec` has no `--draft`."""

from __future__ import annotations

import pytest
import torch

from test_reliability import assert_one_line_error, run

QUESTION = "Name a primary colour."


@pytest.fixture(scope="module")
def smollm2():
    from leanlm.inference import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2")


def test_chat_template_is_the_default_and_only_the_answer_is_printed(smollm2):
    from leanlm.speculative.prompts import encode_chat

    model, tok = smollm2
    rc, out, err = run(["generate", "smollm2", "--prompt", QUESTION, "--max-new-tokens", "8", "--temperature", "0"])
    assert rc == 0, err
    ids = torch.tensor([encode_chat(tok, QUESTION)])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    answer = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert out.strip() == answer.strip() and "<|im_start|>" not in out and QUESTION not in out
    rc, raw, err = run(["generate", "smollm2", "--prompt", QUESTION, "--max-new-tokens", "8", "--temperature", "0",
                        "--no-chat"])
    assert rc == 0, err
    assert raw.startswith(QUESTION)  # raw completion continues the text itself


@pytest.fixture(scope="module")
def plain_answer():
    rc, plain, err = run(["generate", "smollm2", "--prompt", QUESTION, "--max-new-tokens", "10", "--temperature", "0"])
    assert rc == 0, err
    return plain


@pytest.mark.parametrize("spec", ["eagle2", "c2t"])
def test_spec_without_draft_uses_the_committed_head_for_smollm2(spec, plain_answer):
    plain = plain_answer
    rc, out, err = run(["generate", "smollm2", "--prompt", QUESTION, "--max-new-tokens", "10", "--temperature", "0",
                        "--spec", spec])
    assert rc == 0, err
    assert "committed draft head" in err and "draft-smollm2-sharegpt" in err
    assert ("c2t-smollm2-sharegpt" in err) == (spec == "c2t")
    text = out.split("\n[")[0]  # the statistics line follows the answer
    assert text.strip() == plain.strip()  # lossless: the same greedy answer


def test_chat_without_a_template_is_one_line(tiny_config, tmp_path):
    import yaml

    raw = tiny_config(max_steps=2, ckpt_every=2, eval_every=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert run(["train", str(tmp_path / "c.yaml")])[0] == 0
    ckpt = str(tmp_path / "run" / "checkpoints" / "step-00000002")
    assert_one_line_error(*run(["generate", ckpt, "--prompt", "x", "--chat"])[::2], "chat template")
    rc, out, err = run(["generate", ckpt, "--prompt", "The king", "--max-new-tokens", "4"])  # no template: raw
    assert rc == 0 and out.startswith("The king"), err


def test_committed_sharegpt_head_drafts_over_its_vocabulary_and_stays_lossless(smollm2):
    """assets/draft-smollm2-sharegpt (issue #15's ShareGPT head, 8,192 draft ids) loads through its manifest and
    decodes SmolLM2's greedy answer token for token with an EAGLE-2 tree, accepting draft tokens on the way."""
    from leanlm.pretrained import ASSETS
    from leanlm.speculative import Eagle2, SpeculativeDecoder, plain_generate
    from leanlm.speculative.heads import load_head
    from leanlm.speculative.prompts import encode_chat

    model, tok = smollm2
    head, meta = load_head(ASSETS / "draft-smollm2-sharegpt", model.config)
    assert head.draft_vocab is not None and len(head.draft_vocab) == 8192
    # six runs: three epochs over 2,045,366 answer tokens, then one each over 1,913,485, 2,044,814 and 1,966,906 more
    # (assets/README.md)
    assert meta["answer_tokens"] == 1966906 and meta["train"]["cls_target"] == "greedy" and len(meta["history"]) == 5
    ids = torch.tensor([encode_chat(tok, QUESTION)])
    ref, _ = plain_generate(model, ids, 24, eos_token_id=tok.eos_token_id)
    out, stats = SpeculativeDecoder(model, head.eval(), Eagle2(total_tokens=16, depth=4, top_k=4)).generate(
        ids, 24, eos_token_id=tok.eos_token_id)
    assert out == ref and stats.accepted > 0
