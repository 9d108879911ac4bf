"""The training configuration: every field declared once, beside the frozen config it belongs
to (``validation.declared``); this module derives the rest from those declarations.

The layout of a config (an ml_collections ConfigDict, what ``configs/*.py`` return and the
command line's ``--config.FIELD=VALUE`` sets), by section, and the frozen config of each:

* top level: ``DataConfig`` (``data/pipeline.py``) and ``TrainConfig`` (``train/config.py``)
* ``model.*``: ``ModelConfig`` (``model/config.py``)
* ``moe.*``: ``MoEConfig`` (``moe/config.py``)
* ``loss.*``: ``LossConfig`` (``train/loss.py``)

Derived here: ``defaults()`` (the ConfigDict every config file starts from), ``set_fields``
(the command line's overrides, ``None`` included), ``resolve`` (ConfigDict -> the typed,
frozen ``RunConfig`` that the library takes, every check run), ``check_config`` (the one entry
point for every data-free check, the mesh included), ``import_overrides`` (what replaces an
imported checkpoint's router, dtype and remat) and ``configuration_table``
(docs/configuration.md, tested).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jax.sharding import Mesh
from ml_collections import ConfigDict

from dynmoe_jax import sharding, validation
from dynmoe_jax.data.pipeline import DataConfig
from dynmoe_jax.model.config import FFN, ModelConfig
from dynmoe_jax.moe.config import MoEConfig
from dynmoe_jax.pretrained.hf_config import CONFIG_FILE, hf_model_config
from dynmoe_jax.pretrained.load import check_folder
from dynmoe_jax.train.config import LossConfig, TrainConfig
from dynmoe_jax.validation import ConfigError, Constraint, Site, field_path, invalid

# The frozen configs, in the order of the docs; each names its section (``SECTION``).
SECTIONS: tuple[type, ...] = (DataConfig, TrainConfig, ModelConfig, MoEConfig, LossConfig)
# Names a newcomer may type for a field of another name.
ALIASES = {"moe.top_p": "moe.threshold", "moe.p": "moe.threshold", "moe.k": "moe.top_k",
           "moe.experts": "moe.num_experts", "lr": "learning_rate"}  # fmt: skip


def section(owner: type) -> str:
    """The ConfigDict node of a frozen config's fields ('' for the top level)."""
    return getattr(owner, "SECTION", "")


@dataclasses.dataclass(frozen=True)
class Declaration:
    """One field of the training config: its dotted path and its declaration."""

    path: str
    owner: type
    field: dataclasses.Field

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def doc(self) -> str:
        return self.field.metadata["doc"]

    @property
    def default(self) -> Any:
        value = self.field.default
        return value.value if isinstance(value, enum.Enum) else value

    @property
    def overrides_import(self) -> bool:
        """Whether the config's value replaces an imported checkpoint's."""
        return self.field.metadata["override"]

    @property
    def allows(self) -> Constraint:
        return dict(validation.constraints(self.owner))[self.name]

    @property
    def allowed(self) -> str:
        """The allowed range as the docs state it (a bound naming another field by its name)."""
        return self.allows.text(Site(self.owner, self.name))

    @property
    def per_layer(self) -> bool:
        """Whether the field takes one value per layer as well (a ``tuple`` in its type)."""
        hint = typing.get_type_hints(self.owner)[self.name]
        return any(typing.get_origin(t) is tuple for t in typing.get_args(hint))

    @property
    def value_type(self) -> type:
        """The field's type without None (``int | None`` -> int)."""
        hint = typing.get_type_hints(self.owner)[self.name]
        members = [t for t in typing.get_args(hint) if t is not type(None)]
        is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        return members[0] if is_union else hint


@functools.cache
def declarations() -> tuple[Declaration, ...]:
    """Every field the training config exposes, in section and field order."""
    out = []
    for owner in SECTIONS:
        for field in dataclasses.fields(owner):
            if field.metadata.get("cli", False):
                out.append(Declaration(field_path(owner, field.name), owner, field))
    return tuple(out)


def by_path() -> dict[str, Declaration]:
    return {d.path: d for d in declarations()}


def defaults() -> ConfigDict:
    """The config with every field at its declared default (``make train``'s run)."""
    config = ConfigDict({section(s): {} for s in SECTIONS if section(s)}, type_safe=False)
    for d in declarations():
        _put(config, d.path, d.default)
    return config


def _put(config: ConfigDict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def _get(config: Mapping | ConfigDict, path: str) -> Any:
    node = config
    for p in path.split("."):
        node = node[p]
    return node


# ----------------------------------------------------------------------------- command line


def field_paths(config: ConfigDict, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field, e.g. ``['seed', ..., 'moe.threshold', ...]``."""
    paths = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        paths += field_paths(value, f"{path}.") if isinstance(value, ConfigDict) else [path]
    return paths


def unknown_field(path: str, value: str) -> None:
    """The one-line error for ``--config.PATH`` naming no field, with the nearest name."""
    known = [d.path for d in declarations()]
    near = ALIASES.get(path) or next(iter(difflib.get_close_matches(path, known, 1, 0.6)), None)
    hint = f" (did you mean {near}?)" if near else " (see docs/configuration.md for them all)"
    invalid(path, value, f"a field of the config{hint}")


def parse_value(d: Declaration, text: str) -> Any:
    """A command-line value as the field's type; ``None`` for 'None' (the field's check then
    says whether None is allowed)."""
    if text == "None":
        return None
    if "," in text and d.per_layer:
        return tuple(_parse_one(d, part.strip(), text) for part in text.split(","))
    return _parse_one(d, text, text)


def _parse_one(d: Declaration, text: str, typed: str) -> Any:
    """One value of the field's type from ``text``, part of what the user ``typed``."""
    kind = d.value_type
    try:
        if kind is bool:
            return {"true": True, "false": False, "1": True, "0": False}[text.lower()]
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except (KeyError, ValueError):
        invalid(d.path, typed, d.allowed)
    return text  # str and the string enums: the configs check their values


def set_fields(config: ConfigDict, overrides: Mapping[str, str]) -> ConfigDict:
    """A copy of ``config`` with ``overrides`` ({'moe.threshold': '0.3', ...}, values as
    typed) set; a name that is no field, or a value that does not parse, is a one-line
    ConfigError."""
    out = ConfigDict(config.to_dict(), type_safe=False)
    table = by_path()
    for path, text in overrides.items():
        if path not in table:
            unknown_field(path, text)
        _put(out, path, parse_value(table[path], text))
    return out


# ----------------------------------------------------------------------------- resolving


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A training run's typed, frozen config, by section; ``moe`` is the model's."""

    data: DataConfig
    train: TrainConfig
    model: ModelConfig
    loss: LossConfig

    def __post_init__(self):
        batch = Site(DataConfig, "", self.data).show("batch_size")
        divides = self.data.batch_size % self.train.grad_accum_steps == 0
        validation.check_field(self.train, "grad_accum_steps", divides, f"a divisor of {batch}")

    @property
    def moe(self) -> MoEConfig | None:
        return self.model.moe


def _section(config: ConfigDict, owner: type) -> dict[str, Any]:
    """The config's values of ``owner``'s exposed fields (absent ones keep their defaults)."""
    node = config[section(owner)] if section(owner) else config
    return {d.name: node[d.name] for d in declarations() if d.owner is owner and d.name in node}


def resolve(config: ConfigDict) -> RunConfig:
    """The typed config of ``config``, every field and every rule between fields checked; the
    first failure is a one-line ConfigError naming the field."""
    known = {d.path for d in declarations()}
    for path in field_paths(config):
        if path not in known:
            unknown_field(path, _get(config, path))
    folder = check_init_from(config.get("init_from", ""))  # absolute, or ''
    try:
        data = DataConfig(**{**_section(config, DataConfig), "init_from": folder})
        train = TrainConfig(**_section(config, TrainConfig))
        loss = LossConfig(**_section(config, LossConfig))
        model = _model_config(config, data)
    except TypeError as e:  # a comparison of a value of the wrong type
        raise ConfigError(f"a config value has the wrong type: {e}") from None
    return RunConfig(data=data, train=train, model=model, loss=loss)


INIT_FROM_ALLOWED = (
    f"a Hugging Face model folder holding {CONFIG_FILE}, *.safetensors, tokenizer.json"
)


def check_init_from(value: Any) -> str:
    """One-line error unless ``value`` is '' or a folder with config.json; returns the folder
    as an absolute path ('' when unset). None (what a config that needs a checkpoint sets)
    asks for one."""
    if value is None:
        invalid("init_from", value, f"{INIT_FROM_ALLOWED}: this config needs "
                "--config.init_from=PATH")  # fmt: skip
    validation.check(
        isinstance(value, str), "init_from", value, f"'' (none) or {INIT_FROM_ALLOWED}"
    )
    if not value:
        return ""
    folder = Path(value).expanduser()
    validation.check((folder / CONFIG_FILE).is_file(), "init_from", value, INIT_FROM_ALLOWED)
    return str(folder.resolve())


def import_overrides(config: ConfigDict) -> dict[str, Any]:
    """The fields (declared ``override``: the routing, the model's dtype and remat) whose
    config values replace an imported checkpoint's; one set to None keeps the checkpoint's
    (its top_k, its renormalize)."""
    out = {}
    for d in declarations():
        if d.overrides_import:
            out[d.name] = _section(config, d.owner).get(d.name)
    return {name: value for name, value in out.items() if value is not None}


def _model_config(config: ConfigDict, data: DataConfig) -> ModelConfig:
    """The model: the config's own, or an imported checkpoint's with the config's routing."""
    if data.init_from:
        return hf_model_config(data.init_from, **import_overrides(config))
    # The model's own fields first (moe=None), so that an error names model.d_model, not
    # moe.d_model; its ffn is checked there too.
    model = _section(config, ModelConfig)
    shape = ModelConfig(vocab_size=data.vocab_size, **model)
    if FFN(model.get("ffn", FFN.MOE)) is FFN.DENSE:
        return shape
    moe = MoEConfig(d_model=shape.d_model, dtype=shape.dtype, **_section(config, MoEConfig))
    return dataclasses.replace(shape, ffn=FFN.MOE, moe=moe)


def as_dict(run: RunConfig) -> ConfigDict:
    """The ConfigDict of a typed config (what ``workdir/config.json`` records): each field as
    the run has it; a dense model records the declared defaults for ``moe.*``."""
    owners = {DataConfig: run.data, TrainConfig: run.train, ModelConfig: run.model,
              MoEConfig: run.moe, LossConfig: run.loss}  # fmt: skip
    config = defaults()
    for d in declarations():
        source = owners[d.owner]
        if source is not None:
            value = getattr(source, d.name)
            _put(config, d.path, value.value if isinstance(value, enum.Enum) else value)
    return config


# ----------------------------------------------------------------------------- checks


def mesh_for(run: RunConfig, devices=None) -> Mesh:
    """The configured mesh, checked against the devices present and the model's sizes."""
    moe, model = run.moe, run.model
    try:
        mesh = sharding.make_mesh(run.train.mesh_shape, devices)
        sharding.check_fits(
            mesh,
            batch_size=run.data.batch_size,
            grad_accum_steps=run.train.grad_accum_steps,
            num_experts=moe.num_experts if moe else None,
            num_heads=model.num_heads,
            num_kv_heads=model.num_kv_heads,
            d_ff=model.d_ff,
            expert_d_ff=moe.d_ff if moe else None,
        )
    except sharding.MeshError as e:
        raise ConfigError(str(e)) from None
    return mesh


def check_config(config: ConfigDict | RunConfig, devices=None) -> RunConfig:
    """Every check that needs no data, before anything is read or compiled: the fields, the
    rules between them, an imported checkpoint's architecture, tensor shapes (from the file
    headers) and tokenizer, and the mesh (``devices``: what it must fit; default every device
    of this process's runtime)."""
    run = config if isinstance(config, RunConfig) else resolve(config)
    mesh_for(run, devices)
    if run.data.init_from:  # its tensors and tokenizer, from headers: nothing read or made yet
        check_folder(run.data.init_from, run.model)
    return run


# ----------------------------------------------------------------------------- docs


def _cell(value: Any) -> str:
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def configuration_table() -> str:
    """docs/configuration.md: one row per field, from the declarations."""
    lines = [
        "# Configuration",
        "",
        "Every field of the training config, generated from the declarations in the code",
        "(`python -m dynmoe_jax.config > docs/configuration.md`; a test fails when this file",
        "and the code disagree). Set any of them on the command line with",
        "`--config.FIELD=VALUE`; `None` is written `None`.",
        "",
        "| field | default | allowed | meaning |",
        "|---|---|---|---|",
    ]
    defaults_ = defaults()
    for d in declarations():
        cells = [f"`{d.path}`", _cell(_get(defaults_, d.path)), d.allowed, d.doc]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(configuration_table(), end="")
