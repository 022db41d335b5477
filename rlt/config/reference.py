"""The config reference, generated from the schema: every key with its type, default, allowed values, the group and
run files that set it, and its meaning: the comment written next to its default in `rlt/config/` (read from the
source, so the help text lives in one place). `python -m rlt.config --reference` renders it as docs/config.md,
`python -m rlt.config --key KEY` prints one entry.

    doc = key_doc("learning_rate")
    doc.default, doc.algorithms, doc.section      # 1e-05, ('sft', 'grpo', 'rlt'), 'OptimSection'

Torch-free, like the rest of `rlt.config`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import re
import sys
import tokenize
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from rlt.config import checks
from rlt.config.schema import SCHEMAS, _field_default
from rlt.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "cfgs"
REFERENCE_PATH = CONFIG_DIR.parent / "docs" / "config.md"
GROUPS = ("model_cfg", "data_cfg", "trainer_cfg", "reward_cfg", "run_cfg")
NOT_KEYS = ("defaults", "hydra")  # top-level entries of a config file that are Hydra's, not run keys
# Choice keys whose `one_of` check names the key through a variable the source scan cannot follow
INDIRECT_CHOICES = {"reduction_log_prob_fn": "REDUCTIONS", "reduction_kl_fn": "REDUCTIONS"}
NO_HELP = "(no help text yet)"
GENERATE = "python -m rlt.config --reference --write"


@dataclass(frozen=True)
class KeyDoc:
    """One key of the flat run config, as the reference shows it."""

    key: str
    section: str  # the dataclass that declares it (`OptimSection`)
    source: str  # its file, relative to the repo (`rlt/config/sections.py`)
    type: str  # the annotation as written (`str | None`)
    default: Any  # `"???"` (omegaconf.MISSING) = required: a group or run file must set it
    help: str  # the comment beside the default, and the comment lines right above the field
    allowed: tuple[str, ...] = ()  # the values validation accepts, for choice keys
    allowed_name: str = ""  # the constant in rlt/config/checks.py they come from (`DATA_FORMATS`)
    algorithms: tuple[str, ...] = ()  # the algorithms whose run config has the key
    set_by: tuple[tuple[str, Any], ...] = ()  # (`run_cfg=tiny_grpo`, value) for each config file setting it

    @property
    def required(self) -> bool:
        return self.default == "???"

    @property
    def anchor(self) -> str:
        """The key's anchor in docs/config.md (mkdocs' heading slug of the key name)."""
        return self.key.lower()


def sections() -> list[type]:
    """The section dataclasses the run configs are made of, in their order (RunSection first, the teacher reward
    last): every key of every algorithm belongs to exactly one."""
    out: list[type] = []
    for schema in SCHEMAS.values():
        out += [base for base in schema.__bases__ if base not in out]
    return out


def field_help(section: type) -> dict[str, str]:
    """The help text of each field of `section`: its trailing comment, after the comment lines right above it (no
    blank line between), joined into one line.

    >>> from rlt.config import GRPOSection
    >>> field_help(GRPOSection)["top_k"]
    'sample among the k most likely tokens only; null = off'
    """
    lines, comments = _source_comments(inspect.getsourcefile(section))
    tree = ast.parse("".join(lines))
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == section.__name__)
    out = {}
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        row = node.lineno - 1  # 1-based line numbers: lines[row - 1] is the line above the field
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        trailing = [comments[r] for r in range(node.lineno, node.end_lineno + 1) if r in comments]
        out[node.target.id] = " ".join(above + trailing).strip()
    return out


@cache
def _source_comments(path: str) -> tuple[list[str], dict[int, str]]:
    """The lines of a source file and its comments by line number, without the `#`."""
    text = Path(path).read_text()
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    return text.splitlines(keepends=True), comments


def choice_constants() -> dict[str, tuple[str, str]]:
    """key -> (constant name, allowed values) for every choice key: the `one_of(errors, "key", value, CONSTANT)`
    checks in the sections' `problems()` (also inside `for key in ("a", "b")` loops), plus `INDIRECT_CHOICES`.
    A dotted key (`teacher_format.style`) checks a field of a dict key."""
    found = dict(INDIRECT_CHOICES)
    for module in {inspect.getsourcefile(s) for s in sections()}:
        tree = ast.parse(Path(module).read_text())
        for node in ast.walk(tree):
            key, constant = _one_of_arguments(node)
            if isinstance(key, ast.Constant) and isinstance(constant, ast.Name):
                found[key.value] = constant.id
        for loop in ast.walk(tree):  # for key in ("a", "b"): ... one_of(errors, key, ..., CONSTANT)
            if not (isinstance(loop, ast.For) and isinstance(loop.target, ast.Name)
                    and isinstance(loop.iter, ast.Tuple)):
                continue
            names = [e.value for e in loop.iter.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            for node in (n for stmt in loop.body for n in ast.walk(stmt)):
                key, constant = _one_of_arguments(node)
                if getattr(key, "id", None) == loop.target.id and isinstance(constant, ast.Name):
                    found.update(dict.fromkeys(names, constant.id))
    return {key: (name, tuple(getattr(checks, name))) for key, name in found.items()}


def _one_of_arguments(node: ast.AST) -> tuple[ast.AST | None, ast.AST | None]:
    """(key, constant) arguments of a `one_of(errors, key, value, CONSTANT)` call; (None, None) for other nodes."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "one_of" and len(node.args) == 4:
        return node.args[1], node.args[3]
    return None, None


def config_files() -> list[tuple[str, Path]]:
    """(`group=name`, path) of every group and run file, and (`train.yaml`, the root config), in a stable order."""
    files = [("train.yaml", CONFIG_DIR / "train.yaml")]
    for group in GROUPS:
        files += [(f"{group}={p.stem}", p) for p in sorted((CONFIG_DIR / group).glob("*.yaml"))]
    return files


def set_by() -> dict[str, list[tuple[str, Any]]]:
    """key -> [(`group=name`, value)] for every key a config file sets (its top level, Hydra's entries left out)."""
    out: dict[str, list[tuple[str, Any]]] = {}
    for name, path in config_files():
        for key, value in (yaml.safe_load(path.read_text()) or {}).items():
            if key not in NOT_KEYS:
                out.setdefault(key, []).append((name, value))
    return out


@cache
def key_docs() -> dict[str, KeyDoc]:
    """Every key of every algorithm, in schema order (section by section, fields in declaration order)."""
    choices = choice_constants()
    setters = set_by()
    repo = CONFIG_DIR.parent
    docs: dict[str, KeyDoc] = {}
    for section in sections():
        helps = field_help(section)
        source = Path(inspect.getsourcefile(section)).resolve().relative_to(repo).as_posix()
        algorithms = tuple(name for name, schema in SCHEMAS.items() if section in schema.__mro__)
        for f in dataclasses.fields(section):
            if f.name in docs:
                continue
            constant, allowed = _choice_of(f.name, choices)
            docs[f.name] = KeyDoc(
                key=f.name, section=section.__name__, source=source, type=str(f.type), default=_field_default(f),
                help=helps.get(f.name, ""), allowed=allowed, allowed_name=constant, algorithms=algorithms,
                set_by=tuple(setters.get(f.name, ())))
    docs["algorithm"] = dataclasses.replace(docs["algorithm"], allowed=tuple(SCHEMAS), allowed_name="SCHEMAS")
    return docs


def _choice_of(key: str, choices: dict[str, tuple[str, tuple]]) -> tuple[str, tuple[str, ...]]:
    if key in choices:
        return choices[key][0], tuple(map(str, choices[key][1]))
    nested = [(k.split(".", 1)[1], v) for k, v in choices.items() if k.startswith(key + ".")]
    if nested:
        return ", ".join(name for _, (name, _) in nested), tuple(
            f"{field}: {' | '.join(map(str, values))}" for field, (_, values) in nested)
    return "", ()


def keys_without_help() -> list[str]:
    """`section.key` of every key whose field has no help comment."""
    return [f"{d.section}.{d.key}" for d in key_docs().values() if not d.help]


def key_doc(key: str) -> KeyDoc:
    """The entry of `key` (`teacher_format.style`: of `teacher_format`). Raises `ConfigError` for an unknown key,
    with the closest known keys.

    >>> key_doc("lerning_rate")
    Traceback (most recent call last):
    ...
    rlt.errors.ConfigError: lerning_rate: unknown key (did you mean learning_rate?)
    """
    docs = key_docs()
    name = key.split(".", 1)[0]
    if name in docs:
        return docs[name]
    close = difflib.get_close_matches(name, docs, n=3)
    close += [k for k in docs if name and name in k and k not in close][:3 - len(close)]
    hint = f" (did you mean {' or '.join(close)}?)" if close else " (python -m rlt.config --reference lists them)"
    raise ConfigError(f"{key}: unknown key{hint}")


def show(value: Any, width: int = 0) -> str:
    """A value as it would be written in YAML or on the command line, on one line (cut to `width` if given).

    >>> show(None), show(True), show(1e-05), show(["wandb"]), show({"style": "stratos"}), show("")
    ('null', 'true', '1e-05', '[wandb]', '{style: stratos}', "''")
    """
    if value is None or isinstance(value, bool):
        text = {None: "null", True: "true", False: "false"}[value]
    elif isinstance(value, int | float):
        text = repr(value)
    elif isinstance(value, str) and value and value == value.strip() and "\n" not in value:
        text = value
    else:
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True).strip()
        text = text.removesuffix("...").strip()
    text = " ".join(text.split())
    return text if not width or len(text) <= width else text[:width - 3] + "..."


def describe_default(doc: KeyDoc) -> str:
    return "required (no default: a group or run file sets it, `???`)" if doc.required else f"`{show(doc.default)}`"


def render_key(doc: KeyDoc) -> str:
    """The plain-text entry `python -m rlt.config --key KEY` prints."""
    lines = [f"{doc.key}: {doc.type}, default {show(doc.default) if not doc.required else '??? (required)'}",
             f"  {doc.help or NO_HELP}"]
    if doc.allowed:
        lines.append(f"  allowed: {' | '.join(doc.allowed)}  ({doc.allowed_name} in rlt/config/checks.py)"
                     if doc.allowed_name != "SCHEMAS" else f"  allowed: {' | '.join(doc.allowed)}")
    lines.append(f"  algorithms: {', '.join(doc.algorithms)}   declared in {doc.source} ({doc.section})")
    if doc.set_by:
        lines.append("  set by:")
        lines += [f"    {name}: {show(value, 70)}" for name, value in doc.set_by]
    else:
        lines.append("  set by: no config file (the default applies unless the command line sets it)")
    lines.append(f"  docs: docs/config.md#{doc.anchor}")
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    """Text for a markdown paragraph: `<`, `*` and `_` outside code spans would be read as markup."""
    out, code = [], False
    for part in text.split("`"):
        out.append(part if code else part.replace("<", "&lt;").replace("*", r"\*").replace("_", r"\_"))
        code = not code
    return "`".join(out)


def _section_docstring(section: type) -> str:
    return " ".join((inspect.getdoc(section) or "").split("\n\n")[0].split())


def render_markdown() -> str:
    """docs/config.md: an index of the sections, then every key under its section."""
    docs = list(key_docs().values())
    by_section: dict[str, list[KeyDoc]] = {}
    for d in docs:
        by_section.setdefault(d.section, []).append(d)
    out = [
        "# Config reference",
        "",
        f"<!-- generated by `{GENERATE}` from rlt/config/ and cfgs/: do not edit by hand -->",
        "",
        "Every key of the run config, generated from the schema in `rlt/config/` (the type, the default and the "
        "comment beside it) and from the group and run files in `cfgs/` that set it. All groups merge into one flat "
        "namespace, so any key is overridden on the command line by its short name "
        "(`python -m rlt.train run_cfg=tiny_grpo learning_rate=3e-5`); later layers win: the default here, "
        "`cfgs/train.yaml`, the groups (`model_cfg`, `data_cfg`, `trainer_cfg`, `reward_cfg`), the run file "
        "(`run_cfg`), the command line. `python -m rlt.config --key KEY` prints one entry in the terminal; "
        "`python -m rlt.train run_cfg=NAME --print-config` prints the values a run would use.",
        "",
        f"{len(docs)} keys. A key that belongs to other algorithms than the run's is refused when it is set "
        "(\"not used by algorithm=...\").",
        "",
        "| section | algorithms | keys |",
        "|---|---|---|",
    ]
    for section in sections():
        keys = by_section[section.__name__]
        links = ", ".join(f"[{d.key}](#{d.anchor})" for d in keys)
        out.append(f"| [{_title(section)}](#{_title_anchor(section)}) | {', '.join(keys[0].algorithms)} | {links} |")
    for section in sections():
        keys = by_section[section.__name__]
        out += ["", f"## {_title(section)}", "", _md_escape(_section_docstring(section)),
                "", f"Declared in `{keys[0].source}` (`{section.__name__}`); algorithms: "
                f"{', '.join(keys[0].algorithms)}."]
        for d in keys:
            out += ["", f"### `{d.key}`", "", _md_escape(d.help) if d.help else f"*{NO_HELP}*", ""]
            facts = [f"**type** `{d.type}`", f"**default** {describe_default(d)}"]
            if d.allowed:
                facts.append("**allowed** " + " · ".join(f"`{v}`" for v in d.allowed)
                             + (f" (`{d.allowed_name}`)" if d.allowed_name != "SCHEMAS" else ""))
            out.append(" — ".join(facts))
            if d.set_by:
                setters = (f"`{name}`: `{_code(show(value, 60))}`" for name, value in d.set_by)
                out += ["", "Set by: " + ", ".join(setters)]
    return "\n".join(out) + "\n"


def _code(text: str) -> str:
    return text.replace("`", "'")


def _title(section: type) -> str:
    return {"RunSection": "Run, output and logging", "ModelSection": "Model", "DataSection": "Data",
            "OptimSection": "Optimisation and batch", "SFTSection": "SFT", "GRPOSection": "GRPO and generation",
            "RLTSection": "RLT: student and records", "TeacherRewardSection": "RLT: teacher reward"
            }.get(section.__name__, section.__name__)


def _title_anchor(section: type) -> str:
    """mkdocs' (python-markdown toc) slug of the section heading: lower case, word characters, spaces -> '-'."""
    text = re.sub(r"[^\w\s-]", "", _title(section)).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def check_reference(path: Path = REFERENCE_PATH) -> list[str]:
    """What is wrong with the committed reference: keys without help text, and `path` not what the schema
    generates now. Empty = up to date."""
    problems = [f"{key}: no help text (write a comment beside its default in rlt/config/)"
                for key in keys_without_help()]
    if not path.exists():
        problems.append(f"{path} does not exist: run `{GENERATE}`")
    elif path.read_text() != render_markdown():
        problems.append(f"{path} is out of date with rlt/config/ and cfgs/: run `{GENERATE}`")
    return problems


def write_reference(path: Path = REFERENCE_PATH) -> Path:
    path.write_text(render_markdown())
    missing = keys_without_help()
    if missing:
        print(f"warning: {len(missing)} keys have no help text: {', '.join(missing)}", file=sys.stderr)
    return path
