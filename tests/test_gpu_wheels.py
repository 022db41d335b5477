"""scripts/gpu_wheels.py's pure parts: reading the image's package list, leaving to the image what rlt's pins accept,
the manylinux tags, and what it downloads for (pyproject's dependencies without torch, pytest from the dev extra)."""

from __future__ import annotations

import importlib.util

from .conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_wheels", REPO / "scripts" / "gpu_wheels.py")
gpu_wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_wheels)


def test_image_packages_reads_a_freeze_file(tmp_path):
    path = tmp_path / "freeze.txt"
    path.write_text("# pip list --format=freeze\nHuggingFace_Hub==1.33.0\nnumpy==2.5.2\n-e git+https://x#egg=y\n")
    assert gpu_wheels.image_packages(str(path)) == {"huggingface-hub": "1.33.0", "numpy": "2.5.2"}
    assert gpu_wheels.image_packages(None) == {}


def test_left_to_the_image_only_where_the_pins_accept_the_image_version():
    """numpy: no pin of rlt's, the image has it → left out. transformers: pinned >=5.17,<5.18, image 5.17.0 → left
    out. peft: pinned ==0.21.2, image 0.18.0 → downloaded. wandb: not on the image → downloaded."""
    resolved = [{"name": n, "version": "0", "url": ""} for n in ("numpy", "transformers", "peft", "wandb")]
    image = {"numpy": "2.5.2", "transformers": "5.17.0", "peft": "0.18.0"}
    pins = ["transformers>=5.17,<5.18", "peft==0.21.2", "wandb==0.31.0"]
    assert gpu_wheels.left_to_the_image(resolved, image, pins) == {"numpy", "transformers"}


def test_platform_tags_go_down_to_manylinux2014():
    tags = gpu_wheels.platforms("2.28")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and tags[-1] == "manylinux1_x86_64"


def test_requirements_drop_torch_and_keep_pytest():
    import tomllib

    reqs, build = gpu_wheels.requirements(tomllib.loads((REPO / "pyproject.toml").read_text()))
    names = {gpu_wheels.requirement_name(r) for r in reqs}
    assert "torch" not in names and {"trl", "hydra-core", "pytest", "pytest-timeout"} <= names
    assert "ruff" not in names and any(b.startswith("setuptools") for b in build)
