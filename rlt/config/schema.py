"""The run schemas by algorithm, and `validate`: a composed config in, a typed run config out (or one
`ConfigError` listing every problem, each naming the key and the numbers)."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlt.config.grpo import GRPORunConfig
from rlt.config.rlt import RLTRunConfig
from rlt.config.sft import SFTRunConfig
from rlt.errors import ConfigError

SCHEMAS: dict[str, type] = {"sft": SFTRunConfig, "grpo": GRPORunConfig, "rlt": RLTRunConfig}


def _schema_keys(schema: type) -> set[str]:
    return {f.name for f in dataclasses.fields(schema)}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default  # MISSING is the string "???", which OmegaConf reads as a missing value


def all_defaults() -> dict[str, Any]:
    """The default of every key of every algorithm: the base layer of the composed config (`rlt_defaults`).

    Having every key in the composed config lets users override any key by its short name (`use_peft=true`), even
    if no YAML file mentions it; keys of other algorithms left at their defaults are dropped by `validate`.
    """
    out: dict[str, Any] = {}
    for schema in SCHEMAS.values():
        for f in dataclasses.fields(schema):
            out.setdefault(f.name, _field_default(f))
    return out


def register_defaults() -> None:
    """Register `all_defaults()` as the config node `rlt_defaults` that cfgs/train.yaml lists first."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="rlt_defaults", node=all_defaults())


def _unknown_key_message(key: str, schema: type, algorithm: str) -> str:
    owners = [name for name, s in SCHEMAS.items() if name != algorithm and key in _schema_keys(s)]
    if owners:
        return f"{key}: not used by algorithm={algorithm} (it is a key of {', '.join(owners)})"
    close = difflib.get_close_matches(key, sorted(_schema_keys(schema)), n=2)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"{key}: unknown key{hint}"


def unknown_override_message(key: str) -> str:
    """The message for a command-line override of a key no schema has (Hydra refuses it before `validate`)."""
    keys = sorted(set().union(*(_schema_keys(schema) for schema in SCHEMAS.values())))
    close = difflib.get_close_matches(key, keys, n=2)
    hint = f" (did you mean {' or '.join(close)}?)" if close else " (the keys are listed in rlt/config/)"
    return f"{key}: unknown key{hint}"


def validate(cfg: DictConfig | dict) -> Any:
    """Check a composed config and return the typed run config (an `SFTRunConfig`, ...).

    Raises:
        ConfigError: listing every problem found, one per line, each naming the key and the numbers.
    """
    try:
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config does not resolve: {e}") from None
    raw.pop("hydra", None)
    algorithm = raw.get("algorithm")
    if algorithm not in SCHEMAS:
        raise ConfigError(f"algorithm={algorithm!r} is not one of {sorted(SCHEMAS)} (it is set by trainer_cfg)")
    schema = SCHEMAS[algorithm]
    typed = OmegaConf.structured(schema)
    defaults = all_defaults()
    errors: list[str] = []
    for key, value in raw.items():
        if key not in _schema_keys(schema):
            if key not in defaults or value != defaults[key]:  # a key of another algorithm left at its default is fine
                errors.append(_unknown_key_message(key, schema, algorithm))
            continue
        try:
            typed[key] = value
        except OmegaConfBaseException as e:
            msg = str(e).splitlines()[0]
            errors.append(f"{key}={value!r}: wrong type ({msg})")
    errors += [f"{k}: missing value (set it in the run config or on the command line)"
               for k in sorted(OmegaConf.missing_keys(typed))]
    if errors:
        raise ConfigError(_format(errors))
    run = OmegaConf.to_object(typed)
    errors = run.problems()
    if errors:
        raise ConfigError(_format(errors))
    if run.gradient_accumulation_steps is None:
        run.gradient_accumulation_steps = run.derived_gradient_accumulation_steps()
    return run


def _format(errors: list[str]) -> str:
    return "invalid config:\n" + "\n".join(f"  - {e}" for e in errors)


def to_yaml(run: Any) -> str:
    """The validated config as YAML (what `--print-config` shows and what is saved in the run dir)."""
    return OmegaConf.to_yaml(OmegaConf.structured(run))

