"""The documentation: every relative link and image in README.md and docs/*.md points at a file of the repository,
the README's test command is the one CI runs, each script's page lists every flag of the script, and the README's 1M
table gives the committed runs' numbers."""

import csv
import dataclasses
import glob
import os
import re

import numpy as np
import pytest
from conftest import ROOT

import decision_diffuser
import decision_transformer
import sac_continuous
import td3_continuous

PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def relative_targets(text: str) -> list:
    """Markdown link and image targets and HTML src attributes that are paths in the repository (not URLs, not
    anchors within the page), without their #fragment."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)
    return [target.split("#")[0] for target in targets if not re.match(r"[a-z]+:|#", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda path: os.path.relpath(path, ROOT))
def test_every_relative_link_and_image_resolves(page):
    targets = relative_targets(open(page).read())
    assert targets or not page.endswith("README.md"), "no links found in the README: the pattern is wrong"
    missing = [target for target in targets
               if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(page), target)))]
    assert not missing, f"{os.path.relpath(page, ROOT)} links to files that do not exist: {missing}"


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run")) if "pytest" in line and
          not line.lstrip().startswith("#")]
    readme = [line.strip() for line in open(os.path.join(ROOT, "README.md")) if line.startswith("pip install") and
              "pytest" in line]
    assert len(ci) == 1 and readme == ci, (readme, ci)


@pytest.mark.parametrize("module, page", [(sac_continuous, "sac.md"), (td3_continuous, "td3.md"),
                                          (decision_transformer, "decision_transformer.md"),
                                          (decision_diffuser, "decision_diffuser.md")], ids=lambda x: str(x)[-30:])
def test_each_scripts_page_lists_every_flag(module, page):
    text = open(os.path.join(ROOT, "docs", page)).read()
    flags = [f"`--{field.name.replace('_', '-')}`" for field in dataclasses.fields(module.Args)]
    assert [flag for flag in flags if flag not in text] == []


def test_the_readmes_1m_table_gives_the_committed_runs():
    """The "ours" cell of each row of the README's 1M table ("| Hopper, SAC | 3412 (3590) | ...") is the final
    evaluation of seed 1 committed in benchmarks/results/mujoco_1m (and, in brackets, the best point of its curve),
    rounded once from the stored values; where seeds 1-3 are all committed it is their mean +- std (over seeds, as the
    harness's tables) and, in brackets, the best point of their mean curve ("3454 +- 137, 3 seeds (3581)"). A run not
    finished reads "running", and a committed run must be in the table."""
    curves = {}
    for row in csv.DictReader(open(os.path.join(ROOT, "benchmarks", "results", "mujoco_1m", "evaluations.csv"))):
        key = (row["task"].split("-")[0], row["script"].split("_")[0].upper())
        curves.setdefault(key, {}).setdefault(row["seed"], {})[int(row["step"])] = float(row["episodic_return"])
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = {(task, algorithm): cell.strip()
             for task, algorithm, cell in re.findall(r"^\| (\w+), (SAC|TD3) \| ([^|]+) \|", readme, re.MULTILINE)}
    assert len(table) == 6, f"the README's 1M table has {len(table)} rows, expected SAC and TD3 on three tasks"
    expected = {key: "running" for key in table}
    for key, seeds in curves.items():
        for seed, curve in seeds.items():
            assert max(curve) == 1_000_000, f"{key}, seed {seed}: the committed run ends at step {max(curve)}, not 1M"
        if sorted(seeds) == ["1", "2", "3"]:
            finals = np.array([curve[1_000_000] for curve in seeds.values()])
            mean_curve = [np.mean([curve[step] for curve in seeds.values()]) for step in seeds["1"]]
            expected[key] = f"{round(finals.mean())} +- {round(finals.std())}, 3 seeds ({round(max(mean_curve))})"
        elif "1" in seeds:
            expected[key] = f"{round(seeds['1'][1_000_000])} ({round(max(seeds['1'].values()))})"
    assert table == expected
