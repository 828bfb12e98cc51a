"""Run configuration: a YAML file with one section per part of a run, plus `--set section.key=value` overrides.

    model:  LeanLMConfig fields (HF Llama names)    data:  DataConfig    train:  TrainConfig    wisca:  WiscaConfig

`RunConfig` is the typed tree of those sections (torchtitan-style: each component owns its config dataclass; this
module only composes them, with no registry). `build_run_config` validates a nested dict into one: unknown sections
or keys, values of the wrong type and values that contradict another section raise `ConfigError` naming the key and
the fix, before any work starts. `RunConfig.callbacks()` turns the sections that plug into training (WISCA) into the
trainer's callbacks, so the trainer itself knows only the `Callback` protocol.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from leanlm.callbacks import Callback
from leanlm.config import LeanLMConfig
from leanlm.data import DataConfig
from leanlm.errors import ConfigError
from leanlm.train import TrainConfig
from leanlm.wisca import WiscaCallback, WiscaConfig


@dataclass
class RunConfig:
    """One run: the model's fields (a dict, turned into `LeanLMConfig` by `model_config()`) and one dataclass per
    other section."""

    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wisca: WiscaConfig = field(default_factory=WiscaConfig)

    def model_config(self) -> LeanLMConfig:
        return LeanLMConfig(**self.model)

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), **{name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}}

    def callbacks(self) -> list[Callback]:
        """The training callbacks this config asks for, the trainer's default: WISCA's when its section is on."""
        return [WiscaCallback(self.wisca)] if self.wisca.enabled else []


# The sections besides `model`, in file order, with their dataclasses (read from RunConfig's own fields).
SECTIONS: dict[str, type] = {name: hint for name, hint in typing.get_type_hints(RunConfig).items() if name != "model"}


# LeanLMConfig writes its annotations as strings of these parts (`int | None`, `str | list[str]`, ...).
_MODEL_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None), "list[int]": list,
                "list[str]": list}


def _model_fields() -> dict[str, Any]:
    """Each model field's annotation as a type (a union where the annotation names several)."""
    out = {}
    for name, text in LeanLMConfig.__annotations__.items():
        parts = tuple(_MODEL_TYPES[p.strip()] for p in str(text).split("|"))
        out[name] = parts[0] if len(parts) == 1 else typing.Union[parts]
    return out


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a simple type annotation (int, float, bool, str, Optional, unions)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(key, f"{value!r} is not a valid {annotation}", "give a value of that type")
    if annotation is type(None):
        if value is None:
            return None
    elif annotation is Any or origin in (list, dict):
        return value
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(key, f"must be a finite number, got {value!r}", "give a finite value")
            return number
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(key, f"{value!r} is not a {getattr(annotation, '__name__', annotation)}",
                      "give a value of that type")


def build_run_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a nested dict (as read from YAML) into a RunConfig."""
    raw = dict(raw or {})
    unknown = set(raw) - {"model"} - set(SECTIONS)
    if unknown:
        raise ConfigError(str(sorted(map(str, unknown))[0]), "unknown config section",
                          f"use one of {['model'] + list(SECTIONS)}")
    for name, section in raw.items():
        _check_mapping(name, section)
    model_fields = _model_fields()
    model = dict(raw.get("model") or {})
    for key, value in model.items():
        if key not in model_fields:
            raise ConfigError(f"model.{key}", "unknown model field", f"use one of {sorted(model_fields)}")
        model[key] = _coerce(f"model.{key}", value, model_fields[key])
    sections = {}
    for name, cls in SECTIONS.items():
        values = dict(raw.get(name) or {})
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in names:
                raise ConfigError(f"{name}.{key}", "unknown field", f"use one of {sorted(names)}")
            values[key] = _coerce(f"{name}.{key}", value, hints[key])
        obj = cls(**values)
        if hasattr(obj, "check"):
            obj.check()
        sections[name] = obj
    run = RunConfig(model=model, **sections)
    _check_across_sections(run, run.model_config())  # model_config() validates the model section
    return run


def _check_mapping(name: str, section: Any) -> None:
    if section is not None and not isinstance(section, dict):
        raise ConfigError(name, f"a section must be a mapping of key: value, got a {type(section).__name__}",
                          f"write it as `{name}:` followed by indented `key: value` lines (see configs/tiny.yaml)")
    for key in section or {}:
        if not isinstance(key, str):
            raise ConfigError(f"{name}.{key}", "keys must be field names", "see configs/tiny.yaml")


def _check_across_sections(run: RunConfig, model: LeanLMConfig) -> None:
    """Checks that need two sections: WISCA needs whole matrices (no FSDP), the training sequence must fit the
    model's context, and a sparse layer's
    sliding window must fit the training sequence (a larger window never slides, so NSA/ASA's sparse branches
    would train as full attention)."""
    data = run.data
    if run.wisca.enabled and run.train.fsdp:
        raise ConfigError("wisca", "WISCA rescales whole weight matrices in place, which FSDP shards",
                          "train with DDP (train.fsdp: false) when wisca is on")
    if data.seq_len > model.max_position_embeddings:
        raise ConfigError("data.seq_len", f"{data.seq_len} is longer than the model's context "
                          f"max_position_embeddings={model.max_position_embeddings}",
                          f"use data.seq_len <= {model.max_position_embeddings} or raise model.max_position_embeddings")
    if any(kind in ("nsa", "asa") for kind in model.layer_attention) and model.nsa_window > data.seq_len:
        raise ConfigError("model.nsa_window", f"window {model.nsa_window} is longer than the training sequence "
                          f"data.seq_len={data.seq_len}, so it would never slide",
                          f"use model.nsa_window <= {data.seq_len} (a multiple of nsa_select_block)")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested dict; returns a new dict."""
    for name, section in (raw or {}).items():
        _check_mapping(str(name), section)
    out = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like section.key=value", "e.g. --set train.lr=3e-4")
        key, value = item.split("=", 1)
        if "." not in key:
            raise ConfigError(key, "override keys name their section", f"e.g. --set train.{key}=... or model.{key}=...")
        section, name = key.split(".", 1)
        if not section or not name:
            raise ConfigError(key, "an override key is section.field", "e.g. --set train.lr=3e-4")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(key, f"cannot parse value {value!r} ({exc})", "quote strings, e.g. key='text'") from exc
        out.setdefault(section, {})[name] = parsed
    return out


def find_config(name_or_path: str) -> Path:
    """A config path, or the name of a shipped config under `configs/` (e.g. `tiny`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for root in (Path.cwd() / "configs", Path(__file__).resolve().parents[2] / "configs"):
        cand = root / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    raise ConfigError("CONFIG", f"{name_or_path!r} is neither a file nor a shipped config name",
                      "pass a YAML path or one of tiny, tiny-asa, small, 125m, 350m")


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (plain YAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key; let SafeLoader report it
                break
            if duplicate:
                raise ConfigError(str(key), f"is given twice in one mapping (line {key_node.start_mark.line + 1})",
                                  "keep one of them")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_run_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    path = find_config(name_or_path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"is not UTF-8 text ({exc.reason} at byte {exc.start})",
                          "save the file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot be read ({exc.strerror})", "pass a readable YAML file") from None
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ConfigError(str(path), f"is not valid YAML ({first[:200]})", "fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "must be a mapping of sections", "see configs/tiny.yaml")
    return build_run_config(apply_overrides(raw, overrides or []))
