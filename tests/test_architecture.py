"""The architecture holds: layers and no cycles (import-linter), one table per registry, kernels and references with
one signature, one source for defaults, and a command line that answers without loading torch."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), str(ROOT / "architecture.ini")], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_the_command_line_answers_without_torch():
    code = ("import sys; from leanlm.cli import main; "
            "rc = [main(['--help']), main(['train']), main(['spec', 'c2t-train', '--help'])]; "
            "print(rc, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[0, 2, 0] []", done.stdout[-2000:] + done.stderr[-2000:]


def test_lazy_package_exports_resolve():
    import leanlm
    import leanlm.speculative as speculative

    assert sorted(speculative.__all__) == sorted(speculative._WHERE)
    for name in speculative.__all__:
        home = importlib.import_module(f"leanlm.speculative.{speculative._WHERE[name]}")
        assert getattr(speculative, name) is getattr(home, name)
    assert leanlm.LeanLMForCausalLM.__name__ == "LeanLMForCausalLM" and leanlm.LeanLMConfig.model_type == "leanlm"


def test_attention_table_lists_every_config_kind():
    from leanlm.attention import ATTENTION_CLASSES, Attention
    from leanlm.config import ATTENTION_KINDS

    assert list(ATTENTION_CLASSES) == list(ATTENTION_KINDS)
    assert all(issubclass(cls, Attention) for cls in ATTENTION_CLASSES.values())


def test_strategy_table_builds_every_strategy(tmp_path):
    from leanlm.speculative.c2t import C2TClassifier
    from leanlm.speculative.strategies import STRATEGIES, make_strategy, parse_strategy

    C2TClassifier().save(tmp_path / "clf")
    assert sorted(STRATEGIES) == ["c2t", "chain", "eagle2", "static"]
    for name, cls in STRATEGIES.items():
        kw = {"classifier": str(tmp_path / "clf")} if name == "c2t" else {}
        assert type(make_strategy(name, **kw)) is cls and type(parse_strategy(name, **kw)) is cls
    with pytest.raises(ValueError, match="unknown speculative strategy"):
        make_strategy("medusa")


BRANCH_OPS = ("compression_attention", "select_blocks", "selection_attention", "window_attention")


def test_kernel_branch_ops_take_the_references_arguments():
    pytest.importorskip("triton")
    import leanlm.attention.sparse as reference
    from leanlm.kernels import branches, decode_branches

    for name in BRANCH_OPS:
        want = list(inspect.signature(getattr(reference, name)).parameters)
        for impl in (branches, decode_branches):
            got = list(inspect.signature(getattr(impl, name)).parameters)
            assert got == want, (impl.__name__, name, got, want)
    assert (reference.LATENT_PARTS, branches.LATENT_PARTS, decode_branches.LATENT_PARTS) == (False, False, True)


def test_c2t_training_defaults_have_one_source():
    from leanlm.cli import build_parser
    from leanlm.speculative.c2t_config import C2TTrainConfig

    args = vars(build_parser().parse_args(["spec", "c2t-train", "rows.safetensors", "--out", "clf"]))
    defaults = dataclasses.asdict(C2TTrainConfig())
    shared = set(defaults) & set(args)
    assert shared >= {"hidden", "feature_scaling", "neg_ratio", "epochs", "lr", "batch_size", "val_fraction", "beta",
                      "seed"}
    assert {k: args[k] for k in shared} == {k: defaults[k] for k in shared}


def test_one_schedule_and_one_atomic_writer():
    import leanlm.speculative.c2t_train as c2t_train
    import leanlm.speculative.train_draft as train_draft
    import leanlm.train as train
    from leanlm.checkpoint import atomic_write_file
    from leanlm.schedule import lr_lambda

    assert train.lr_lambda is lr_lambda and train_draft.lr_lambda is lr_lambda
    assert train_draft.atomic_write_file is atomic_write_file and c2t_train.atomic_write_file is atomic_write_file
    for module in (train_draft, c2t_train):  # no hand-rolled temporary-file renames left
        assert "os.replace" not in inspect.getsource(module) and ".tmp" not in inspect.getsource(module)
