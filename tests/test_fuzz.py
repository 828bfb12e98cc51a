"""Property-based fuzzing (hypothesis) of the CLI and of the config / checkpoint loaders.

Whatever the values, types or file damage, a command ends in exit 0 or exit 2 with one `error:` line: never a
traceback, never a hang (each test is bounded by pytest-timeout) and never a changed file outside the run's own
out_dir. The examples are derandomized so that CI is reproducible; LEANLM_FUZZ_EXAMPLES=N scales every test up
(e.g. 2000) for a longer hunt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from leanlm.errors import LeanLMError
from test_reliability import run

SCALE = int(os.environ.get("LEANLM_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int):
    return settings(max_examples=SCALE or examples, deadline=None, derandomize=not SCALE, database=None,
                    suppress_health_check=list(HealthCheck))


def check_outcome(rc: int, err: str) -> None:
    assert rc in (0, 2), (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    if rc == 2:
        last = err.strip().splitlines()[-1]
        assert ": error: " in last, err[-3000:]


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and (skip is None or skip not in p.parents) and p.name != ".lock"}


# ------------------------------------------------------------------------------------------------ values
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(-3, 40), max_size=4), st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(["", "auto", "gqa", "mla", "gla", "nsa", "asa", "tensor", "channel", "never", "bf16", "1e-3",
                     "nan", "-inf", "bundled,", ","]),
)


def _section_fields() -> dict[str, list[str]]:
    from leanlm.config import LeanLMConfig
    from leanlm.data import DataConfig
    from leanlm.train import TrainConfig
    from leanlm.wisca import WiscaConfig

    return {"model": list(LeanLMConfig.__annotations__),
            "data": [f.name for f in dataclasses.fields(DataConfig)],
            "train": [f.name for f in dataclasses.fields(TrainConfig)],
            "wisca": [f.name for f in dataclasses.fields(WiscaConfig)]}


FIELDS = _section_fields()
KEYS = st.one_of(*[st.tuples(st.just(s), st.sampled_from(names)) for s, names in FIELDS.items()],
                 st.tuples(st.sampled_from(["model", "train", "junk"]), st.text(min_size=1, max_size=6)))


@fuzz_settings(300)
@given(st.lists(st.tuples(KEYS, JUNK), max_size=4), st.one_of(st.none(), st.lists(st.integers(), max_size=2),
                                                              st.just("text")))
def test_fuzz_run_config_values_and_types(tiny_config_raw, overrides, section_value):
    """Any mix of fields, values and types gives a valid RunConfig or one LeanLMError."""
    from leanlm.runconfig import build_run_config

    raw = {k: dict(v) for k, v in tiny_config_raw.items()}
    for (section, key), value in overrides:
        raw.setdefault(section, {})[key] = value
    if section_value is not None:
        raw["wisca"] = section_value
    try:
        run = build_run_config(raw)
    except LeanLMError:
        return
    run.model_config()  # a config that was accepted really is usable


@pytest.fixture(scope="module")
def tiny_config_raw(corpus_dir, tmp_path_factory):
    from conftest import tiny_raw_config

    return tiny_raw_config(corpus_dir, tmp_path_factory.mktemp("fuzz") / "never-written")


# ------------------------------------------------------------------------------------------- train CLI
SMALL_INT = st.integers(-3, 64)
# Plausible values (so that many examples get past validation and really train) mixed with junk ones.
PLAUSIBLE = st.one_of(st.integers(0, 8), st.sampled_from([16, 32, 48, 64, 128]), st.floats(0, 1), st.booleans(),
                      st.sampled_from(["auto", "never", "fp32", "gqa", "mla", "gla", "tensor", "group", "channel",
                                       "l2", "reset", "rescale", "lr", "half", "log"]))
CLI_VALUES = st.one_of(PLAUSIBLE, PLAUSIBLE, SMALL_INT, st.floats(-10, 10),
                       st.floats(allow_nan=True, allow_infinity=True), st.none(),
                       st.text(alphabet="abcxyz-,.:0123456789 ", max_size=6), st.lists(SMALL_INT, max_size=3))
# What the fuzzed training may touch: out_dir and data.source stay fixed (a random path could name any folder).
TRAIN_KEYS = [("model", k) for k in FIELDS["model"]] + [("train", k) for k in FIELDS["train"] if k != "out_dir"] \
    + [("data", k) for k in ("seq_len", "val_fraction", "text_field")] + [("wisca", k) for k in FIELDS["wisca"]]


@pytest.mark.timeout(900)
@fuzz_settings(40)
@given(st.lists(st.tuples(st.sampled_from(TRAIN_KEYS), CLI_VALUES), min_size=1, max_size=2))
def test_fuzz_train_command(corpus_dir, overrides):
    from conftest import tiny_raw_config

    root = Path(tempfile.mkdtemp(prefix="leanlm-fuzz-"))
    try:
        out = root / "run"
        raw = tiny_raw_config(corpus_dir, out, max_steps=2, ckpt_every=2, eval_every=2, eval_batches=1)
        cfg = root / "cfg.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        sets = []
        for (section, key), value in overrides:
            if section == "train" and key in ("max_steps", "eval_batches", "batch_size", "grad_accum") \
                    and isinstance(value, int) and not isinstance(value, bool):
                value = min(value, 3)  # keep each example a few seconds; the field's validation is still fuzzed
            sets += ["--set", f"{section}.{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"]
            if sets[-1].endswith("\n..."):
                sets[-1] = sets[-1][:-4]
        before = snapshot(root, skip=out) | snapshot(corpus_dir)
        rc, _, err = run(["train", str(cfg), *sets])
        event("trained" if rc == 0 else "refused")
        check_outcome(rc, err)
        assert snapshot(root, skip=out) | snapshot(corpus_dir) == before
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture(scope="module")
def fuzz_run(corpus_dir, tmp_path_factory):
    from conftest import tiny_raw_config

    root = tmp_path_factory.mktemp("fuzzrun")
    raw = tiny_raw_config(corpus_dir, root / "run", max_steps=4, ckpt_every=2, eval_every=2)
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    rc, _, err = run(["train", str(root / "cfg.yaml")])
    assert rc == 0, err
    return root


DAMAGE = st.sampled_from(["truncate", "flip", "garbage", "delete", "empty", "json"])
TARGETS = st.sampled_from(["config.json", "model.safetensors", "trainer_state.pt", "run_config.json", "manifest.json",
                           "tokenizer.json", "tokenizer_config.json", "../latest", "../../metrics.jsonl",
                           "../../run_config.json"])


@pytest.mark.timeout(900)
@fuzz_settings(40)
@given(TARGETS, DAMAGE, st.integers(0, 2**31), st.sampled_from(["generate", "eval", "train"]),
       st.booleans(), JUNK)
def test_fuzz_damaged_checkpoint(fuzz_run, target, damage, where, command, drop_manifest, json_value):
    work = Path(tempfile.mkdtemp(prefix="leanlm-fuzz-"))
    try:
        shutil.copytree(fuzz_run / "run", work / "run")
        ckpt = work / "run" / "checkpoints" / "step-00000004"
        if drop_manifest:
            (ckpt / "manifest.json").unlink()
        path = (ckpt / target).resolve()
        if path.exists():
            data = path.read_bytes()
            if damage == "truncate":
                path.write_bytes(data[: where % max(1, len(data))])
            elif damage == "flip" and data:
                b = bytearray(data)
                b[where % len(b)] ^= 1 << (where % 8)
                path.write_bytes(bytes(b))
            elif damage == "garbage":
                path.write_bytes(os.urandom(1 + where % 300))
            elif damage == "delete":
                path.unlink()
            elif damage == "empty":
                path.write_bytes(b"")
            elif damage == "json":
                import json

                path.write_text(json.dumps(json_value, allow_nan=True))
        before = snapshot(fuzz_run)
        if command == "generate":
            argv = ["generate", str(ckpt), "--prompt", "The king", "--max-new-tokens", "4"]
        elif command == "eval":
            argv = ["eval", str(ckpt), "--batches", "1"]
        else:
            cfg = yaml.safe_load((fuzz_run / "cfg.yaml").read_text())
            cfg["train"].update(out_dir=str(work / "run"), max_steps=6)
            (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
            argv = ["train", str(work / "cfg.yaml")]
        rc, _, err = run(argv)
        check_outcome(rc, err)
        assert snapshot(fuzz_run) == before  # the original run is never touched
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -------------------------------------------------------------------------------------------- CLI arguments
NUMBER_TEXT = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                        st.text(alphabet="0123456789.-+eEnaif x", max_size=6))


@pytest.mark.timeout(900)
@fuzz_settings(40)
@given(st.text(max_size=40), st.lists(st.tuples(st.sampled_from(["--max-new-tokens", "--temperature", "--top-k",
                                                                  "--seed"]), NUMBER_TEXT), max_size=3),
       st.sampled_from(["generate", "eval"]))
def test_fuzz_generate_and_eval_arguments(fuzz_run, prompt, flags, command):
    ckpt = fuzz_run / "run" / "checkpoints" / "step-00000004"
    before = snapshot(fuzz_run)
    if command == "generate":
        argv = ["generate", str(ckpt), "--prompt", prompt]
        for flag, value in flags:
            argv += [flag, value]
    else:
        argv = ["eval", str(ckpt)]
        for (_, value), flag in zip(flags, ("--batches", "--batch-size", "--limit")):
            argv += [flag, value]
    rc, _, err = run(argv)
    check_outcome(rc, err)
    assert snapshot(fuzz_run) == before
