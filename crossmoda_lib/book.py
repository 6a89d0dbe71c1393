"""The companion to read without running it: a static site built from a finished run.

``crossmoda book outputs/demo`` (or ``./run_all.sh book``) turns the executed notebooks of a run
(``<run>/executed/NN_*.ipynb``, made by ``crossmoda run``) into HTML pages with nbconvert's JupyterLab
template, and adds an index page (the method in one picture, the run's headline table, links to the
nine stages) and a results page (every table and figure of stage 09). Nothing is trained or
recomputed: the pages show the saved outputs. Every page is a notebook rendered by nbconvert, the
index and the results page too (built as notebooks here), so no HTML is written by hand.

The site is written to ``<run>/book`` by default, into a staging folder that replaces the previous
site only when complete.
"""

from __future__ import annotations

import base64
import io as _io
import json
import shutil
from pathlib import Path

from crossmoda_lib import io as cio

#: the method, stage by stage, as the index page's picture draws it
STEPS = (
    ("ceT1 + labels", "source (London, Tilburg)"),
    ("02 CycleGAN", "ceT1 -> pseudo-hrT2"),
    ("03 Van Cittert", "sharpened pseudo-hrT2"),
    ("04-05 SinGAN + TBA", "tumours scaled by lambda,\nharmonised"),
    ("06 3D networks", "VS and cochlea apart"),
    ("07 self-training", "pseudo-labels on real hrT2"),
    ("08-09 hrT2 labels", "Dice, ASSD per centre"),
)


def method_picture() -> bytes:
    """The pipeline as a row of boxes (PNG bytes), drawn with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(17, 2.4))
    ax.set_xlim(0, len(STEPS) * 2.4)
    ax.set_ylim(0, 2)
    ax.axis("off")
    for k, (name, what) in enumerate(STEPS):
        x = 2.4 * k + 0.1
        colour = "#dbe9f6" if k in (1, 2, 3) else "#fde7c8" if k in (4, 5) else "#e6e6e6"
        ax.add_patch(plt.Rectangle((x, 0.35), 2.0, 1.3, facecolor=colour, edgecolor="#444444"))
        ax.text(x + 1.0, 1.25, name, ha="center", va="center", fontsize=9.5, weight="bold")
        ax.text(x + 1.0, 0.75, what, ha="center", va="center", fontsize=8)
        if k + 1 < len(STEPS):
            ax.annotate("", xy=(x + 2.38, 1.0), xytext=(x + 2.02, 1.0), arrowprops={"arrowstyle": "->", "color": "#444444"})
    ax.text(0.1, 0.1, "blue: unsupervised domain adaptation (image level); orange: segmentation (nnU-Net style, 3D)", fontsize=8, color="#444444")
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _title(nb) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return "untitled"


def _summary(nb) -> str:
    """The notebook's "What this stage does." paragraph, its first sentence."""
    for cell in nb.cells:
        if cell.cell_type == "markdown" and "**What this stage does.**" in cell.source:
            text = cell.source.split("**What this stage does.**", 1)[1].strip().split("\n\n")[0].replace("\n", " ")
            return text.split(". ")[0].rstrip(".") + "."
    return ""


def _image_cell(png: bytes, nbformat):
    cell = nbformat.v4.new_code_cell("")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(png).decode()})]
    return cell


def _nav(pages: list[tuple[str, str]], k: int | None) -> str:
    links = ["[Index](index.html)"]
    if k is not None and k > 0:
        links.append(f"[< {pages[k - 1][1]}]({pages[k - 1][0]}.html)")
    if k is not None and k + 1 < len(pages):
        links.append(f"[{pages[k + 1][1]} >]({pages[k + 1][0]}.html)")
    links.append("[Results](results.html)")
    return " · ".join(links)


def build(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Render a finished run as a static site; return its folder.

    Raises:
        DataError: the run has no executed notebooks (name the folder).
    """
    import nbformat
    from nbconvert import HTMLExporter

    run_dir = Path(run_dir)
    executed = run_dir / "executed"
    notebooks = sorted(executed.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise cio.DataError(f"{executed}: no executed notebooks; run a profile first (./run_all.sh, or crossmoda run params/<profile>.yaml)")
    out = Path(out) if out is not None else run_dir / "book"
    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    manifest_path = run_dir / "run_manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}

    full = HTMLExporter(template_name="lab")
    outputs_only = HTMLExporter(template_name="lab", exclude_input=True)
    loaded = [(path.stem, nbformat.read(path, as_version=4)) for path in notebooks]
    pages = [(stem, _title(nb)) for stem, nb in loaded]
    for k, (stem, nb) in enumerate(loaded):
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(_nav(pages, k)))
        nb.cells.append(nbformat.v4.new_markdown_cell(_nav(pages, k)))
        html, _ = full.from_notebook_node(nb, resources={"metadata": {"name": pages[k][1]}})
        (staging / f"{stem}.html").write_text(html)

    tables = run_dir / "09_evaluation" / "tables"
    figures = run_dir / "09_evaluation" / "figures"
    headline = tables / "table1.md"
    profile = manifest.get("profile") or run_dir.name
    facts = [f"profile `{profile}`"]
    for key, label in (("seed", "seed"), ("git_commit", "commit")):
        if key in manifest:
            facts.append(f"{label} `{str(manifest[key])[:12]}`")
    if manifest.get("notebooks"):
        facts.append(f"{sum(n.get('wall_s', 0) for n in manifest['notebooks']) / 60:.1f} minutes for {len(manifest['notebooks'])} notebooks")
    stages = [f"{k + 1}. [{title}]({stem}.html): {_summary(nb)}" for k, ((stem, title), (_, nb)) in enumerate(zip(pages, loaded))]
    index = nbformat.v4.new_notebook()
    index.cells = [
        nbformat.v4.new_markdown_cell(
            "# crossmoda-companion\n\n"
            "Tumour blending augmentation using one-shot generative learning for crossmodal MRI segmentation "
            "(crossMoDA 2022, LaTIM), executed: vestibular schwannoma and cochlea segmented on hrT2 MRI with "
            "labels only on ceT1. These pages are the notebooks of one finished run, with their figures and "
            "tables; nothing here was recomputed.\n\n" + "This run: " + ", ".join(facts) + "."
        ),
        nbformat.v4.new_markdown_cell("## The method in one picture"),
        _image_cell(method_picture(), nbformat),
        nbformat.v4.new_markdown_cell("## Headline\n\n" + (headline.read_text() if headline.is_file() else "This run has no scores (no ground truth): see the results page.")),
        nbformat.v4.new_markdown_cell("## The stages\n\n" + "\n".join(stages) + "\n\n[Results and ablations](results.html)"),
    ]
    html, _ = outputs_only.from_notebook_node(index, resources={"metadata": {"name": "crossmoda-companion"}})
    (staging / "index.html").write_text(html)

    results = nbformat.v4.new_notebook()
    results.cells = [nbformat.v4.new_markdown_cell(_nav(pages, None) + "\n\n# Results and ablations\n\nEvery table and figure stage 09 saved, as saved.")]
    for table in sorted(tables.glob("*.md")) if tables.is_dir() else []:
        results.cells.append(nbformat.v4.new_markdown_cell(f"### {table.stem}\n\n{table.read_text()}"))
    for figure in sorted(figures.glob("*.png")) if figures.is_dir() else []:
        results.cells.append(nbformat.v4.new_markdown_cell(f"### {figure.stem}"))
        results.cells.append(_image_cell(figure.read_bytes(), nbformat))
    html, _ = outputs_only.from_notebook_node(results, resources={"metadata": {"name": "Results"}})
    (staging / "results.html").write_text(html)

    old = out.with_name(f".{out.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return out
