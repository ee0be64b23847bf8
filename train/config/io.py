"""Reading configs: YAML recipes and dotted overrides -> a validated `Config`; writing it back;
the key reference that `--help` prints."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from train.config.fields import check
from train.config.schema import Config
from train.errors import UserError


@dataclasses.dataclass(frozen=True)
class CommandLineValue:
    """An override's text, read as YAML only where the key is not a string: so that
    `prompt.item_template={title} by {brand}` stays the text it is."""

    key: str
    text: str


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    if isinstance(value, CommandLineValue):
        if tp is str:
            return value.text
        value = parse_override(f"{value.key}={value.text}")[1]
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return _build(typing.cast(type, tp), value, key + ".")
    if origin is list:
        (inner,) = typing.get_args(tp)
        check(isinstance(value, list), key, f"expected a list of {_describe(inner)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return {k: parse_override(f"{v.key}={v.text}")[1] if isinstance(v, CommandLineValue) else v
                for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        # YAML 1.1 reads exponent notation without a dot (lr: 1e-4) as a string.
        return float(value)
    if tp is float and isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "-inf"):
        return float(value)  # as --help prints them; YAML's own spelling is .inf
    if tp is str and value is None:
        return ""
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `data.dir=2024` is a directory name, not a number
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    check(ok, key, f"expected {_describe(tp)}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise UserError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    for f in dataclasses.fields(cls):
        # A mapping given in YAML or on the command line updates the default mapping instead
        # of replacing it, so `model.architecture.hidden_size=128` keeps the other keys.
        if f.name in kwargs and typing.get_origin(hints[f.name]) is dict and f.default_factory is not dataclasses.MISSING:
            kwargs[f.name] = {**f.default_factory(), **kwargs[f.name]}
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.max_steps=10` -> ("train.max_steps", 10); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise UserError(f"{text!r}: overrides are dotted keys, e.g. train.max_steps=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise UserError(f"{key}: cannot read value {raw!r} ({err.__class__.__name__})") from None
    return key, value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:  # type: ignore[assignment]
    """Read a YAML recipe, apply dotted overrides, validate everything, return the Config."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"{path}: the top level must be a mapping of config keys")
        tree = loaded or {}
    for text in overrides:
        key, _ = parse_override(text) if "=" not in text else (text.partition("=")[0], None)
        if not key or any(not p for p in key.split(".")):
            raise UserError(f"{text!r}: overrides are dotted keys, e.g. train.max_steps=10")
        _set_dotted(tree, key, CommandLineValue(key, text.partition("=")[2]))
    return _build(Config, tree)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config (every key, defaults included) atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))
    tmp.replace(path)


def describe_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf key: the reference printed by `--help`."""
    rows: list[tuple[str, str, str]] = []
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe_keys(type(value), prefix + f.name + "."))
        else:
            rows.append((prefix + f.name, repr(value), f.metadata.get("help", "")))
    return rows


# Keys a run may change between its launches without becoming another run: where and how it
# runs (engine, precision, memory savers that leave the gradients as they are), how long, and how
# often it logs, saves and evaluates.
RUN_SETTINGS = ("output_dir", "resume", "device", "engine", "overwrite", "train.max_steps", "train.log_every",
                "train.save_every", "train.eval_every", "train.keep_last", "train.collective_timeout",
                "train.max_bad_steps", "train.grad_cache_chunk", "train.report_to", "train.compile", "train.precision",
                "model.gradient_checkpointing", "model.attn_implementation", "model.unpadded", "model.shared_prefix",
                "model.lora.fused", "model.fused_norm", "data.dir", "data.shards", "data.num_workers",
                "data.on_bad_shard", "eval.", "deepspeed.")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not (prefix + key).endswith(("architecture", "user_tower", "synthetic")):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def other_run(saved: Path, config: Config) -> list[str]:
    """The keys in which the run saved in `saved` (a run directory's config.yaml) differs from
    `config` in what it trains, as 'key: old -> new' (empty: the same run, resumable)."""
    try:
        previous = _flat(to_dict(load_config(saved)))
    except UserError as err:
        return [f"its config.yaml does not load ({err})"]
    current = _flat(to_dict(config))
    return [f"{key}: {previous.get(key)!r} -> {current.get(key)!r}" for key in sorted(set(previous) | set(current))
            if not key.startswith(RUN_SETTINGS) and previous.get(key) != current.get(key)]
