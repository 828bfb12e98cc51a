"""Run configuration: a YAML file with one section per part of a run, plus `--set section.key=value` overrides.

    model:  LeanLMConfig fields (HF Llama names)      data:  DataConfig      train:  TrainConfig

Other parts of leanlm add their own sections with `register_section` (e.g. `wisca`). Unknown sections or keys,
and values of the wrong type, raise `ConfigError` naming the key and the fix before any work starts.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from leanlm.config import LeanLMConfig
from leanlm.errors import ConfigError

SECTIONS: dict[str, type] = {}


def register_section(name: str, cls: type) -> None:
    """Make dataclass `cls` the schema of the run-config section `name`."""
    SECTIONS[name] = cls


def _model_fields() -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(LeanLMConfig)
            if f.name in LeanLMConfig.__annotations__}


@dataclass
class RunConfig:
    model: dict[str, Any]
    sections: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    def model_config(self) -> LeanLMConfig:
        return LeanLMConfig(**self.model)

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), **{k: dataclasses.asdict(v) for k, v in self.sections.items()}}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a simple type annotation (int, float, bool, str, Optional, unions)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing, "Any": Any})  # annotations are postponed strings
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(key, f"{value!r} is not a {getattr(annotation, '__name__', annotation)}",
                      "give a value of that type")


def build_run_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a nested dict (as read from YAML) into a RunConfig."""
    from leanlm import train as _train  # noqa: F401  (registers the train/data sections)
    from leanlm import wisca as _wisca  # noqa: F401  (registers the wisca section)

    raw = dict(raw or {})
    unknown = set(raw) - {"model"} - set(SECTIONS)
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown config section",
                          f"use one of {['model'] + sorted(SECTIONS)}")
    model_fields = _model_fields()
    model = dict(raw.get("model") or {})
    for key, value in model.items():
        if key not in model_fields:
            raise ConfigError(f"model.{key}", "unknown model field", f"use one of {sorted(model_fields)}")
        model[key] = _coerce(f"model.{key}", value, model_fields[key].type)
    sections = {}
    for name, cls in SECTIONS.items():
        values = dict(raw.get(name) or {})
        fields_ = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in fields_:
                raise ConfigError(f"{name}.{key}", "unknown field", f"use one of {sorted(fields_)}")
            values[key] = _coerce(f"{name}.{key}", value, fields_[key].type)
        obj = cls(**values)
        if hasattr(obj, "check"):
            obj.check()
        sections[name] = obj
    run = RunConfig(model=model, sections=sections)
    run.model_config()  # validates the model section
    return run


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested dict; returns a new dict."""
    out = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like section.key=value", "e.g. --set train.lr=3e-4")
        key, value = item.split("=", 1)
        if "." not in key:
            raise ConfigError(key, "override keys name their section", f"e.g. --set train.{key}=... or model.{key}=...")
        section, name = key.split(".", 1)
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


def load_run_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    path = find_config(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"is not valid YAML ({exc})", "fix the YAML syntax") from exc
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "must be a mapping of sections", "see configs/tiny.yaml")
    return build_run_config(apply_overrides(raw, overrides or []))
