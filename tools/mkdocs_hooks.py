"""MkDocs hooks: BENCHMARKS.md (at the repository root, where GitHub readers find it) becomes the site's
benchmarks.md page, and links between the docs and it are rewritten so that the same Markdown works on GitHub and in
the site."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

BENCHMARKS = "benchmarks.md"
# from docs/x.md the page is ../BENCHMARKS.md, from docs/methods/x.md ../../BENCHMARKS.md
_TO_BENCHMARKS = re.compile(r"\]\(((?:\.\./)*)\.\./BENCHMARKS\.md")


def on_files(files, config):
    root = Path(config["config_file_path"]).parent
    text = (root / "BENCHMARKS.md").read_text(encoding="utf-8")
    files.append(File.generated(config, BENCHMARKS, content=text))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == BENCHMARKS:
        # BENCHMARKS.md links docs/x.md from the root; in the site it sits beside them
        return markdown.replace("](docs/", "](")
    return _TO_BENCHMARKS.sub(r"](\1" + BENCHMARKS, markdown)
