"""The one job registry (pipeline/registry.py): the CLI, `anatdiff submit` and README's table agree with it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from jobs import cli
from pipeline.config import UserError
from pipeline.distributed import submit as sub
from pipeline.registry import JOBS, cluster_jobs, find_job

REPO = Path(__file__).resolve().parent.parent
HELPERS = {"__init__", "_common", "cli"}


def test_every_job_module_is_registered_and_every_entry_has_a_main():
    modules = {p.stem for p in (REPO / "jobs").glob("*.py")} - HELPERS
    assert {j.module for j in JOBS} == modules
    for job in JOBS:
        tree = ast.parse((REPO / "jobs" / f"{job.module}.py").read_text(encoding="utf-8"))
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), job.module


@pytest.mark.parametrize("job", [j for j in JOBS if j.config is not None], ids=lambda j: j.module)
def test_the_registry_names_the_config_class_the_job_resolves(job):
    """The class submit validates with is the one the job itself loads (``resolve(<Config>, ...)``)."""
    tree = ast.parse((REPO / "jobs" / f"{job.module}.py").read_text(encoding="utf-8"))
    used = {n.args[0].id for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") ==
            "resolve" and n.args and isinstance(n.args[0], ast.Name)}
    assert used == {job.config.__name__}


def test_cli_commands_come_from_the_registry():
    assert cli.COMMANDS == {j.command: (f"jobs.{j.module}", j.help) for j in JOBS}
    assert "submit" in cli.COMMANDS and "submit" not in [j.module for j in cluster_jobs()]


def test_submit_runs_exactly_the_registry_cluster_jobs():
    assert sub.job_names(REPO) == sorted(j.module for j in cluster_jobs())
    assert find_job("train-guide", cluster=True) is find_job("train_guide", cluster=True)
    with pytest.raises(UserError, match="unknown job 'submit'"):
        find_job("submit", cluster=True)


@pytest.mark.parametrize("job", [j for j in cluster_jobs() if j.config is not None], ids=lambda j: j.module)
def test_submit_validates_every_job_config_locally(job, tmp_path):
    """study, compare and export were once missing here, so their configs went unchecked before upload."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("bogus_field: 1\n")
    with pytest.raises(UserError, match="field 'bogus_field': unknown field"):
        sub.validate_locally(job.module, cfg, [])


def test_submit_validates_study_compare_export_presets_and_overrides(tmp_path):
    sub.validate_locally("study", REPO / "jobs" / "configs" / "study-phantom-small.yaml", [])
    with pytest.raises(UserError, match="seedz"):
        sub.validate_locally("study", REPO / "jobs" / "configs" / "study-phantom-small.yaml", ["seedz=1"])
    compare = tmp_path / "compare.yaml"
    compare.write_text("run_ids: [abc]\n")
    sub.validate_locally("compare", compare, [])
    with pytest.raises(UserError, match="protocol"):
        sub.validate_locally("compare", compare, ["protocol=nope"])
    export = tmp_path / "export.yaml"
    export.write_text("out: /tmp/x\n")
    with pytest.raises(UserError, match="export needs run_id"):
        sub.validate_locally("export", export, [])
    sub.validate_locally("export", export, ["run_id=abc"])


def test_readme_command_table_lists_exactly_the_registry_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## What you get", 1)[1].split("\n\n", 2)[1]
    listed = set()
    for row in table.splitlines()[2:]:
        listed.update(re.findall(r"`anatdiff ([a-z-]+)", row.split(" | ")[0]))
    assert listed == {j.command for j in JOBS}
