"""The documentation: the generated config reference (docs/config.md) matches the schema and every key has help
text; the site's navigation lists every page; `mkdocs build --strict` passes (broken links and anchors fail it);
and (slow) the CPU commands of docs/getting-started.md and docs/first-run.md run as the pages say."""

import dataclasses
import doctest
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import rlt.config.reference as R
from rlt.config import SCHEMAS, checks
from rlt.config.__main__ import main as config_main
from rlt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


# ----------------------------------------------------------------------------------------------- the config reference


def test_docs_config_md_is_generated_from_the_schema():
    assert R.REFERENCE_PATH == DOCS / "config.md"
    assert (DOCS / "config.md").read_text() == R.render_markdown(), (
        "docs/config.md is out of date with rlt/config/ and cfgs/: run `python -m rlt.config --reference --write`")


def test_every_key_has_help_text():
    """The help text is the comment beside a field's default (or the comment lines right above it)."""
    missing = R.keys_without_help()
    assert not missing, f"{len(missing)} keys have no help comment in rlt/config/: {', '.join(missing)}"


def test_the_reference_has_every_key_of_every_algorithm_once():
    keys = {f.name for schema in SCHEMAS.values() for f in dataclasses.fields(schema)}
    docs = R.key_docs()
    assert set(docs) == keys
    for schema_name, schema in SCHEMAS.items():
        for f in dataclasses.fields(schema):
            assert schema_name in docs[f.name].algorithms
    text = (DOCS / "config.md").read_text()
    assert all(f"### `{key}`" in text for key in keys)
    assert docs["learning_rate"].algorithms == ("sft", "grpo", "rlt") and docs["top_p"].algorithms == ("grpo", "rlt")
    assert docs["max_length"].algorithms == ("sft",) and docs["clip_kl"].algorithms == ("rlt",)


def test_allowed_values_are_the_validation_constants():
    docs = R.key_docs()
    assert docs["data_format"].allowed == checks.DATA_FORMATS and docs["data_format"].allowed_name == "DATA_FORMATS"
    assert docs["normalize_kl_fn"].allowed == checks.NORMALIZATIONS  # checked inside a `for key in (...)` loop
    assert docs["reduction_kl_fn"].allowed == checks.REDUCTIONS
    assert docs["teacher_format"].allowed == ("style: stratos | r1",)  # a field of a dict key
    assert docs["algorithm"].allowed == tuple(SCHEMAS)
    # every choice constant of checks.py documents some key: a new constant without its key would go unseen
    constants = {name for name, value in vars(checks).items()
                 if name.isupper() and isinstance(value, tuple) and all(isinstance(v, str) for v in value)}
    used = {name for d in docs.values() for name in d.allowed_name.split(", ") if name}
    assert constants <= used, f"choice constants no key's entry shows: {sorted(constants - used)}"


def test_documented_choices_are_what_validation_accepts(compose):
    """A value outside a key's documented list is refused, and validation's message lists the same values."""
    from omegaconf import OmegaConf

    from rlt.config import validate

    cfg = compose(["run_cfg=tiny_grpo"])
    for key in ("data_format", "loss_type", "generation_backend", "optim", "mixed_precision", "torch_dtype"):
        bad = OmegaConf.merge(cfg, {key: "not-a-choice"})
        with pytest.raises(ConfigError) as e:
            validate(bad)
        assert f"{key}='not-a-choice' is not one of {list(R.key_doc(key).allowed)}" in str(e.value)


def test_set_by_lists_the_group_and_run_files():
    doc = R.key_doc("num_generations")
    assert ("run_cfg=tiny_grpo", 4) in doc.set_by and ("trainer_cfg=grpo_mono_85gb", 24) in doc.set_by
    assert {("trainer_cfg=grpo", "grpo"), ("trainer_cfg=sft", "sft"), ("trainer_cfg=teacher_grpo", "rlt")} <= set(
        R.key_doc("algorithm").set_by)
    setters = R.set_by()
    unset = [key for key in R.key_docs() if key not in setters]
    assert unset and all(R.key_doc(key).set_by == () for key in unset)
    # every key a config file sets is a documented key (the reference cannot miss one)
    assert set(setters) <= set(R.key_docs())


def test_help_is_read_from_trailing_and_preceding_comments(tmp_path, monkeypatch):
    source = '''
from dataclasses import dataclass


@dataclass
class Section:
    """A section."""

    plain: int = 1
    trailing: int = 2  # the comment beside it
    # a comment above,
    # on two lines
    above: str = "x"  # and one beside
    # separated by a blank line: not the next field's help

    after_blank: bool = True
    spread: tuple = (
        1,
        2,
    )  # beside the closing line
'''
    path = tmp_path / "docs_section_example.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("docs_section_example", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "docs_section_example", module)
    spec.loader.exec_module(module)
    assert R.field_help(module.Section) == {
        "plain": "", "trailing": "the comment beside it", "above": "a comment above, on two lines and one beside",
        "after_blank": "", "spread": "beside the closing line"}


def test_reference_doctests():
    assert doctest.testmod(R).failed == 0


def test_key_cli_prints_one_entry(capsys):
    assert config_main(["--key", "num_generations"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("num_generations: int, default 8\n  completions per prompt (the group of the advantage)")
    assert "run_cfg=tiny_grpo: 4" in out and "docs/config.md#num_generations" in out
    assert config_main(["--key", "teacher_format.style"]) == 0
    assert "allowed: style: stratos | r1" in capsys.readouterr().out


def test_key_cli_unknown_key_suggests_the_closest(capsys):
    assert config_main(["--key", "lerning_rate"]) == 2
    assert capsys.readouterr().err == "error: lerning_rate: unknown key (did you mean learning_rate?)\n"
    with pytest.raises(ConfigError, match=r"lora: unknown key \(did you mean lora_r or lora_alpha or lora_dropout"):
        R.key_doc("lora")


def test_check_cli_fails_on_a_stale_reference(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(R, "keys_without_help", lambda: [])  # the staleness check alone
    stale = tmp_path / "config.md"
    stale.write_text("# an old reference\n")
    assert config_main(["--reference", "--check", "--path", str(stale)]) == 1
    assert "is out of date" in capsys.readouterr().err
    assert config_main(["--reference", "--write", "--path", str(stale)]) == 0
    assert config_main(["--reference", "--check", "--path", str(stale)]) == 0
    assert stale.read_text() == R.render_markdown()


def test_check_cli_fails_on_missing_help(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(R, "keys_without_help", lambda: ["RunSection.seed"])
    path = tmp_path / "config.md"
    path.write_text(R.render_markdown())
    assert config_main(["--reference", "--check", "--path", str(path)]) == 1
    assert "RunSection.seed: no help text" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------- the site


def _nav_files(nav) -> list[str]:
    out = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        out += _nav_files(value) if isinstance(value, list) else [value]
    return out


def test_the_navigation_lists_every_page_and_only_pages_that_exist():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav = _nav_files(config["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages, f"not in the nav: {sorted(set(pages) - set(nav))}; no such page: " \
                                 f"{sorted(set(nav) - set(pages))}"


def test_relative_links_between_pages_resolve():
    """What `mkdocs build --strict` checks too, without mkdocs: every link to a page names an existing one."""
    link = re.compile(r"\]\(([^)#\s]+\.md)(#[^)\s]*)?\)")
    for page in DOCS.rglob("*.md"):
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target, _ in link.findall(text):
            assert (page.parent / target).is_file(), f"{page.name} links to {target}, which does not exist"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    """The whole site with its API pages: a broken link, anchor, nav entry or docstring warning fails it (what
    `make docs` runs; 5-20 s, so in the slow suite)."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="the docs extra is not installed (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "TeacherKLReward" in api and "locate" in api and "GRPOTrainer" in api and "estimate" in api
    config = (tmp_path / "site" / "config" / "index.html").read_text()
    assert 'id="learning_rate"' in config


# ------------------------------------------------------------------------------- the pages' commands, run (slow)


def _make_recipe(target: str) -> list[str]:
    """The command lines of a Makefile target, with `$(PY)` as this Python."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().split("  #")[0].replace("$(PY)", sys.executable))
    return recipe


def _run(command: str, cwd: Path, *, expect: int = 0) -> str:
    env = {**os.environ, "RLT_CACHE_DIR": os.environ["RLT_CACHE_DIR"], "WANDB_MODE": "disabled"}
    command = re.sub(r"^python ", f"{sys.executable} ", command)
    result = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True, env=env, timeout=3600)
    assert result.returncode == expect, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.mark.slow
def test_getting_started_make_demo_runs(tmp_path):
    """What `make demo` runs after installing (the Makefile's own recipe), in a fresh dir: the outputs the page
    describes exist."""
    page = (DOCS / "getting-started.md").read_text()
    for command in _make_recipe("demo"):
        _run(command, tmp_path)
    results = tmp_path / "results"
    for run in ("demo_teacher_sft", "demo_rlt", "demo_student_sft"):
        for name in ("config.yaml", "metrics.jsonl", "summary.json", "final", "plots"):
            assert (results / run / name).exists(), f"{run}/{name}"
            assert f"`{name}" in page
    assert (results / "demo_report" / "report.html").is_file() and (results / "distill" / "demo.jsonl").is_file()


WARM = ("run_name=tiny_grpo_warm model_name_or_path=results/tiny_sft_reasoning/final max_completion_length=64 "
        "max_steps=30")
FIRST_RUN = [  # the commands of docs/first-run.md, in its order (each must appear in the page verbatim)
    "python -m rlt.config --key num_generations",
    "python -m rlt.train run_cfg=tiny_grpo max_steps=4",
    "python -m rlt.train run_cfg=tiny_grpo max_steps=4",  # again: finished, nothing to do
    "python -m rlt.train run_cfg=tiny_grpo max_steps=6",  # resumes
    "python -m rlt.train run_cfg=tiny_grpo max_steps=6 learning_rate=3e-4",  # refused: changes what is trained
    "python -m rlt.train run_cfg=tiny_sft_reasoning",
    f"python -m rlt.train run_cfg=tiny_grpo {WARM}",
    f"python -m rlt.train -m run_cfg=tiny_grpo {WARM} learning_rate=1e-4,1e-3",
    "python -m rlt.report results/tiny_grpo_warm/multirun",
    "python -m rlt.evaluate results/tiny_grpo --limit 16",
    "python -m rlt.evaluate results/tiny_grpo_warm --limit 100",
]


@pytest.mark.slow
def test_first_run_commands_run_as_the_page_says(tmp_path):
    """The page's commands, in a fresh dir, with what the page says about each (~5 min on an idle 2-core machine)."""
    outputs = [_run(command, tmp_path, expect=2 if "learning_rate=3e-4" in command else 0) for command in FIRST_RUN]
    key, first, again, resumed, refused, warm_up, warm, sweep, report, evaluate, evaluate_warm = outputs
    assert "set by:" in key and "run_cfg=tiny_grpo: 4" in key
    assert "step 4/4 | reward" in first and "no learning signal" in first
    assert "nothing to do" in again
    assert "resuming from" in resumed and "checkpoint-4" in resumed and "step 6/6" in resumed
    assert "learning_rate: 0.0001 -> 0.0003" in refused and "resume=force" in refused
    assert "eval @ step 300" in warm_up and "step 30/30" in warm
    zero_std = [float(m) for m in re.findall(r"zero-std ([0-9.]+)", warm)]
    assert min(zero_std) < 1, "after the warm-up, some groups get different rewards (a learning signal)"
    jobs = tmp_path / "results" / "tiny_grpo_warm" / "multirun"
    assert sorted(p.name for p in jobs.iterdir() if p.is_dir() and "=" in p.name) == [
        "learning_rate=0.0001", "learning_rate=0.001"]
    assert "learning_rate" in report and (jobs / "report" / "report.html").is_file()
    assert "accuracy" in evaluate and "accuracy" in evaluate_warm
    for name in ("config.yaml", "config_history.jsonl", "metrics.jsonl", "samples.jsonl", "summary.json", "final",
                 "checkpoint-4", "checkpoint-6", "plots", "eval"):
        assert (tmp_path / "results" / "tiny_grpo" / name).exists(), name


def test_slow_commands_are_the_pages_commands():
    """The slow tests above run what the pages show (cheap, in the default suite)."""
    page = (DOCS / "first-run.md").read_text()
    missing = [c for c in FIRST_RUN if c not in page]
    assert not missing, f"docs/first-run.md no longer shows: {missing}"
    assert "make demo" in (DOCS / "getting-started.md").read_text()
    assert any("rlt.train run_cfg=teacher_sft_tiny" in line for line in _make_recipe("demo"))
