"""docs/results.md is what `make results` writes from the files its sections name, and every number in it is in the
file its section names: nothing in it was typed by hand."""
import re
from pathlib import Path

import results

NUMBER = re.compile(r"\d+(?:\.\d+)?")


def unsourced(page: str, root: Path = results.ROOT) -> dict[str, list[str]]:
    """Per section of `page`, the numbers that its file (named in its "From `FILE`" line) does not hold."""
    missing = {}
    for name, body in results.sections(page).items():
        source = (root / name).read_text()
        absent = [n for n in NUMBER.findall(body) if not re.search(rf"(?<![\d.]){re.escape(n)}(?!\d)", source)]
        if absent:
            missing[name] = absent
    return missing


def test_the_page_is_what_make_results_writes():
    assert results.PAGE.read_text() == results.page(), "docs/results.md differs from its sources: run `make results`"


def test_every_number_comes_from_the_file_its_section_names():
    page = results.PAGE.read_text()
    assert set(results.sections(page)) == {s.relative_to(results.ROOT).as_posix()
                                           for _, s, _, _ in results.SECTIONS if s.is_file()}
    assert not unsourced(page)


def test_a_typed_number_is_found(tmp_path):
    (tmp_path / "speed.md").write_text("speed-up: 1.48x (1.47-1.57 over 3 rounds)\n")
    page = "# Results\n\n## Speed\n\nFrom `speed.md` (`make bench`).\n\nspeed-up: 1.48x (1.47-1.57 over 3 rounds), 1.4x"
    assert unsourced(page, tmp_path) == {"speed.md": ["1.4"]}


def test_the_readme_links_to_the_page_and_states_no_timing():
    readme = (results.ROOT / "README.md").read_text()
    assert "docs/results.md" in readme
    assert not re.findall(r"\d+(?:\.\d+)?\s*(?:minutes|seconds|s\b|x\b|×)", readme)


def test_every_file_of_docs_that_the_project_names_is_there():
    """A document removed (as the README's old timing history was) leaves no pointer to it behind."""
    named = re.compile(r"docs/[\w./-]*\w\.(?:md|png|csv|json|yaml|xml)")
    sources = [results.ROOT / name for name in ("README.md", "Makefile")] + [
        path for pattern in ("*.py", "notebooks/*.py", "bench/*.py", "tests/*.py", "configs/**/*.yaml", "docs/*.md")
        for path in results.ROOT.glob(pattern)]
    written_by_make = {"docs/.speed.md"}  # make bench's file while it writes docs/speed.md
    missing = {(path.name, name) for path in sources for name in named.findall(path.read_text())
               if name not in written_by_make and not (results.ROOT / name).exists()}
    assert not missing, f"(file, the docs/ file it names that is not there): {sorted(missing)}"
