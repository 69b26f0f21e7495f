"""docs/results.md: every measured number a reader needs (the demo's minutes and key numbers, the tests' time,
the targets, the study, the speed ratios) in one file, gathered from the files the measuring commands write.

    make results    # python results.py: after `make demo`, `make test`, `make test-browser` (and when
                    # `make bench`, `make study` or `study.py --targets` have written their files anew)

Nothing in docs/results.md is typed: each section names the one file it comes from and copies that file's numbers
unchanged, which tests/test_results.py checks. The files of run folders, which git ignores (runs/demo/report.md,
runs/tests/*.xml), are first copied into docs/results/, so the page and its check hold in any clone; where a run
folder has none (no `make demo` here yet, or a smoke run), the last copy stays.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DOCS = ROOT / "docs"
PAGE, COPIES = DOCS / "results.md", DOCS / "results"
# run-folder file -> its copy in docs/results/
RUN_FILES = {"runs/demo/report.md": "demo.md", "runs/tests/unit.xml": "unit-tests.xml",
             "runs/tests/browser.xml": "browser-tests.xml"}
# what the study section shows of docs/study/study.md, one column per row of that table
STUDY_ROWS = ("R@1 factor, k=n_shared", "R@1 pair, k=n_shared", "vision leak into shared embedding (max), k=n_shared",
              "touch leak into shared embedding (max), k=n_shared", "touch recon cos, k=all", "seeds")


def measured_on() -> str:
    """The commit and machine a timing was taken at, as the demo's report, the tests' XML and docs/speed.md say it."""
    import torch
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    models = re.findall(r"^model name\s*: (.*)$", cpuinfo.read_text(), flags=re.M) if cpuinfo.exists() else []
    cpu = models[0] if models else platform.processor() or "a CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"commit {commit} on {cores} cores of {cpu}, torch {torch.__version__}"


def copy_run_files():
    """Copy each run-folder file that is there into docs/results/; a smoke run's report is not a result."""
    COPIES.mkdir(exist_ok=True)
    for source, copy in RUN_FILES.items():
        path = ROOT / source
        if not path.is_file() or "(smoke mode)" in path.read_text().split("\n", 1)[0]:
            continue
        if copy.endswith(".md"):  # the report's figure links point into its run folder: not copied
            (COPIES / copy).write_text(path.read_text().split("\n## Figures\n")[0].rstrip() + "\n")
        else:  # the suites' counts and times, not every test's (tens of kilobytes a run)
            tree = ET.parse(path)
            for suite in tree.getroot().iter("testsuite"):
                for case in suite.findall("testcase"):
                    suite.remove(case)
            tree.write(COPIES / copy, encoding="unicode")


def demoted(markdown: str) -> str:
    """A file's Markdown below its title, each heading one level down, to sit under a section of the page."""
    body = re.sub(r"\A# .*\n+", "", markdown)
    return re.sub(r"^(#+) ", r"#\1 ", body, flags=re.M).strip()


def demo(copy: Path) -> str:
    return ("Each notebook's minutes and key numbers of the last `make demo` (`runs/demo/report.md`).\n\n"
            + demoted(copy.read_text()))


def tests(copy: Path) -> str:
    """The suite's counts and seconds as its JUnit XML states them (its name says the commit and machine)."""
    suite = ET.parse(copy).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    columns = {"tests": "tests", "failures": "failed", "errors": "errors", "skipped": "skipped", "time": "seconds",
               "timestamp": "started"}
    return "\n".join([f"Measured at {suite.get('name')}.", "", "| " + " | ".join(columns.values()) + " |",
                      "|---" * len(columns) + "|", "| " + " | ".join(suite.get(c, "") for c in columns) + " |"])


def targets(source: Path) -> str:
    intro = "The default model against the coarse-to-fine targets, mean ± std over its runs."
    return f"{intro}\n\n{source.read_text().strip()}"


def study(source: Path) -> str:
    """The study table turned round (a row per design) and cut to the measures of the notebooks' study figure."""
    rows = {}
    for line in source.read_text().splitlines()[2:]:
        name, *cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[name] = cells
    variants = [c.strip() for c in source.read_text().splitlines()[0].strip().strip("|").split("|")][1:]
    header = ["design", *STUDY_ROWS]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join([v] + [rows[r][i] for r in STUDY_ROWS]) + " |" for i, v in enumerate(variants)]
    return ("Every phase-1 design, mean ± std over seeds on the test split: the reference results notebooks fall back "
            "on (`make study` writes your own to `runs/study/study.md`). The whole table, every measure: the file "
            "named above.\n\n" + "\n".join(lines))


def speed(source: Path) -> str:
    return demoted(source.read_text())


# (heading, the file it comes from, the command that writes that file, how the section is written from it)
SECTIONS = [
    ("The demo", COPIES / "demo.md", "make demo", demo),
    ("The tests", COPIES / "unit-tests.xml", "make test", tests),
    ("The browser test", COPIES / "browser-tests.xml", "make test-browser", tests),
    ("Targets", DOCS / "targets.md", "study.py --targets", targets),
    ("The study", DOCS / "study" / "study.md", "study.py --reference", study),
    ("Speed", DOCS / "speed.md", "make bench", speed),
]


def page() -> str:
    """docs/results.md from the files SECTIONS names; a section whose file is missing says how to make it."""
    lines = ["# Results", "", "Written by `make results` from the files each section names, never by hand: run the "
             "command a section names, then `make results`.", ""]
    for heading, source, command, write in SECTIONS:
        name = source.relative_to(ROOT).as_posix()
        lines += [f"## {heading}", "", f"From `{name}` (`{command}`)."
                  if source.is_file() else f"Nothing yet: `{command}`, then `make results`.", ""]
        if source.is_file():
            lines += [write(source), ""]
    return "\n".join(lines)


def sections(text: str) -> dict[str, str]:
    """The page's sections by the file each comes from (for tests/test_results.py)."""
    found = {}
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        source = re.search(r"^From `([^`]+)`", part, flags=re.M)
        if source:
            found[source.group(1)] = part.split("\n", 1)[1]
    return found


def main():
    copy_run_files()
    PAGE.write_text(page())
    print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
