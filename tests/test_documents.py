"""Formatted documents in (PDF, HTML, DOCX, PPTX, EPUB): atom texts and their provenance, on
the committed fixtures in tests/data (tests/data/make_fixtures.py made them)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from click.testing import CliRunner
from test_chunking import TOK

from compiler.chunking import chunk_document
from compiler.documents import Document, read_documents
from compiler.readers.structure import Heading, Paragraph, Table, assemble, join_lines
from microlora.core.config import ChunkConfig
from microlora.core.provenance import cite

DATA = Path(__file__).parent / "data"


def atoms(name: str | Path) -> list[tuple[str, int, tuple[str, ...]]]:
    """(text, page, section) of each atom of a fixture (or of a file); every atom is a slice
    of its document's text."""
    docs, skipped = read_documents([DATA / name])
    assert skipped == [] and len(docs) == 1
    out = chunk_document(docs[0], TOK)
    assert all(docs[0].text[a.start:a.end] == a.text for a in out)
    return [(a.text, a.page, a.section) for a in out]


def test_pdf_pages_sections_table_rows_without_running_headers():
    intro, workshop, results = ("Introduction",), ("Introduction", "Workshop"), ("Results",)
    assert atoms("report.pdf") == [
        ("Brightwater Clockworks builds tower clocks in the town of Ostrel.", 1, intro),
        ("The company was founded in 1911 by Ada Quenby, a watchmaker from Kinsley.", 1, intro),
        # hyphenated at a line end in the PDF ("infor-" / "mation"): joined
        ("The board publishes this information every spring for the people of Ostrel.", 1,
         intro),
        ("The workshop keeps its original steam lathe in working order.", 1, workshop),
        ("Twelve apprentices trained there during the year.", 1, workshop),
        ("The largest clock of the year was built for the cathedral of Velmora and weighs "
         "four tonnes.", 2, results),
        ("Most other clocks went to railway stations in the north.", 2, results),
        ("Year: 2018, Revenue: 3.2 M, Clocks: 14", 2, results),  # a row with its header
        ("Year: 2019, Revenue: 4.1 M, Clocks: 19", 2, results),
        ("Revenue is given in millions of euros, before tax.", 2, results),
    ]
    text = read_documents([DATA / "report.pdf"])[0][0].text
    assert "Annual Report" not in text and "Page 1" not in text  # running header, footer


def test_html_main_text_without_navigation_banners_or_footer():
    top = ("The Velmora clock",)
    built = top + ("How it was built",)
    got = atoms("site.html")
    assert [a[0] for a in got][:2] == [
        "The new cathedral clock of Velmora was hung in its tower on a cold morning in "
        "February, after two years of work in the Brightwater workshop in Ostrel.",
        "Its dial is six metres across and was painted by hand by the brothers Anselm and "
        "Piet Radu, who also gilded the hands."]
    assert ("Part: Bell, Material: Bronze, Weight: 2.1 t", 0, built) in got
    assert ("Part: Pendulum, Material: Iron, Weight: 310 kg", 0, built) in got
    assert got[-1][2] == top + ("What comes next",) and len(got) == 7
    doc = read_documents([DATA / "site.html"])[0][0]
    assert doc.title == "The Velmora clock"
    for boilerplate in ("cookies", "Contact us", "Related stories", "Copyright", "newsletter"):
        assert boilerplate not in doc.text


def test_html_inline_code_and_emphasis_stay_in_their_sentence(tmp_path):
    (tmp_path / "doc.html").write_text(
        "<html><body><nav><a href='/'>Home</a> <a href='/docs'>Docs</a></nav><article>"
        "<h1>Tools</h1><p>The standard distribution ships with a tool called <code>rustdoc"
        "</code>, which turns <b>comments</b> into pages. It was first released in 2012 by "
        "the core team of the language.</p><pre><code>$ rustdoc src/lib.rs</code></pre>"
        "</article></body></html>")
    got = [a[0] for a in atoms(tmp_path / "doc.html")]
    assert got[:2] == [
        "The standard distribution ships with a tool called rustdoc, which turns comments "
        "into pages.",
        "It was first released in 2012 by the core team of the language."
        "\n\n$ rustdoc src/lib.rs"]  # the short code block: a fragment, joined as in text


def test_docx_headings_are_sections_not_atoms():
    survey, tides = ("Harbour survey",), ("Harbour survey", "Tides")
    assert atoms("notes.docx") == [
        ("The harbour of Ostrel was surveyed in May by the crew of the Marguerite.", 0, survey),
        ("Its deepest berth lies beside the old grain quay.", 0, survey),
        ("Spring tides lift the water by four metres at the harbour mouth.", 0, tides),
        ("Station: North pier, Depth: 7.5 m", 0, tides),
        ("Station: Grain quay, Depth: 11.2 m", 0, tides),
        ("The lighthouse keeper, Tomas Vey, has kept the light since 1987.", 0,
         ("Lighthouse",)),
    ]
    assert read_documents([DATA / "notes.docx"])[0][0].title == "Field notes"


def test_pptx_slides_and_epub_chapters_smoke():
    assert atoms("deck.pptx") == [
        ("Orders for tower clocks doubled in the third quarter.", 1, ("Quarterly review",)),
        ("A second workshop opens in Velmora next spring.", 2, ("Next steps",))]
    assert atoms("book.epub") == [
        ("Ada Quenby opened her workshop in Ostrel in the spring of 1911.", 0,
         ("The workshop",)),
        ("Her last clock was hung in the cathedral tower of Velmora.", 0, ("The cathedral",))]


def test_a_table_row_is_one_atom_with_its_table_as_context():
    doc = read_documents([DATA / "report.pdf"])[0][0]
    rows = [a for a in chunk_document(doc, TOK, ChunkConfig(min_chars=100))
            if a.text.startswith("Year")]  # rows never join a neighbour, however short
    assert [r.at for r in rows] == [0, 1]
    assert rows[0].context == rows[1].context == tuple(r.text for r in rows)


def test_bad_files_are_named_with_the_reason_and_the_rest_compiles(tmp_path):
    for name in ("encrypted.pdf", "scanned.pdf", "report.pdf"):
        shutil.copy(DATA / name, tmp_path / name)
    whole = (DATA / "notes.docx").read_bytes()
    (tmp_path / "truncated.docx").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "empty.html").write_text("<html><head><script>app()</script></head>"
                                         "<body><div id='root'></div></body></html>")
    (tmp_path / "bad.pptx").write_bytes(b"PK\x03\x04 not really")
    docs, skipped = read_documents([tmp_path])
    assert [Path(d.source).name for d in docs] == ["report.pdf"]
    reasons = {Path(s.source).name: s.reason for s in skipped}
    assert reasons["encrypted.pdf"].startswith("encrypted: it needs a password")
    assert reasons["scanned.pdf"].startswith("no text layer (an image-only or scanned PDF?)")
    assert reasons["truncated.docx"].startswith("not a readable DOCX file")
    assert reasons["empty.html"].startswith("no main text found in this page")
    assert reasons["bad.pptx"].startswith("not a readable PPTX file")
    assert len(skipped) == 5


def test_a_missing_docs_extra_names_the_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pdfplumber", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "compiler.readers.pdf", raising=False)
    (tmp_path / "a.txt").write_text("Plain text still compiles without the extra.")
    shutil.copy(DATA / "report.pdf", tmp_path / "report.pdf")
    docs, skipped = read_documents([tmp_path])
    assert [Path(d.source).name for d in docs] == ["a.txt"]
    assert skipped[0].reason == ("reading .pdf files needs the docs extra (pdfplumber is not "
                                 "installed): pip install 'microlora[docs]'")


def test_markdown_gets_sections_and_keeps_its_atoms(tmp_path):
    text = ("# Guide\n\nIntro sentence that is long enough.\n\n## Setup\n\n"
            "```sh\n# not a heading, a comment in code\n```\n\nInstall it with pip first.\n\n"
            "Usage\n-----\n\nRun the command on your notes.")
    (tmp_path / "guide.md").write_text(text)
    doc = read_documents([tmp_path / "guide.md"])[0][0]
    plain = chunk_document(Document(doc.source, doc.text, doc.title), TOK)
    got = chunk_document(doc, TOK)
    assert [(a.text, a.start, a.end) for a in got] == [(a.text, a.start, a.end) for a in plain]
    # an atom's section is the one it starts in ("# not a heading" is code, not a section)
    assert [a.section for a in got] == [("Guide",), ("Guide", "Setup"), ("Guide", "Setup"),
                                        ("Guide", "Usage")]
    assert doc.title == "Guide"


def test_assemble_joins_hyphens_and_paragraphs_carried_over_a_page():
    doc = assemble("x.pdf", [
        Heading("Results", 1, page=1),
        Paragraph("The clock was built for the cathe-", page=1),
        Paragraph("dral of Velmora in 2019.", page=2, continues=True),
        Table((("Year", "Revenue"), ("2019", "4.1 M"), ("Year", "Revenue"), ("", "")), 2),
        Heading("Notes", 2, page=3),
        Paragraph("Short.", page=3),
    ])
    assert doc.text == ("Results\n\nThe clock was built for the cathedral of Velmora in 2019."
                        "\n\nYear: 2019, Revenue: 4.1 M\n\nNotes\n\nShort.")
    assert [doc.text[b.start:b.end] for b in doc.blocks] == [
        "The clock was built for the cathedral of Velmora in 2019.",
        "Year: 2019, Revenue: 4.1 M", "Short."]
    assert doc.place(doc.text.index("The clock")) == (1, ("Results",))
    assert doc.place(doc.text.index("dral"))[0] == 2  # the carried-over text is on page 2
    assert doc.place(doc.text.index("Short")) == (3, ("Results", "Notes"))
    assert join_lines(["well-", "known", "twenty-", "Five"]) == "wellknown twenty- Five"


def test_pdf_running_lines_headings_and_column_breaks():
    """The PDF reader's inferences on laid-out lines: repeated edge lines and page numbers
    go, larger lines are headings by size, and a paragraph cut by a break goes on."""
    from compiler.readers.pdf import _Line, _Page, _parts

    def page(number, *boxes):
        return _Page(number, [[_Line(t, s, top) for t, s, top in box] for box in boxes])

    pages = [
        page(1, [("ACME report 2019", 9, 10)], [("Overview", 16, 40)],
             [("The plant opened in a cold", 10, 60), ("winter and never closed.", 10, 72)],
             [("The second paragraph goes on to the next", 10, 90)], [("1", 9, 800)]),
        page(2, [("ACME report 2019", 9, 10)], [("page and ends there.", 10, 40)],
             [("Details", 13, 60)], [("A fact under details.", 10, 80)], [("2", 9, 800)]),
    ]
    parts = _parts(pages)
    assert parts == [
        Heading("Overview", 1, 1),
        Paragraph("The plant opened in a cold winter and never closed.", 1),
        Paragraph("The second paragraph goes on to the next", 1),
        Paragraph("page and ends there.", 2, continues=True),
        Heading("Details", 2, 2),
        Paragraph("A fact under details.", 2),
    ]


def test_cite_formats_provenance():
    assert cite("report.pdf", 2, ["Results"]) == "report.pdf p. 2, Results"
    assert cite("deck.pptx", 3, ["Next steps"]) == "deck.pptx slide 3, Next steps"
    assert cite("a.md", 0, ["Guide", "Setup"], 5, 9) == "a.md:5-9, Guide > Setup"
    assert cite("d1") == "d1" and cite("a.txt", start=0, end=4) == "a.txt:0-4"


# -- compiled, on tiny models -----------------------------------------------------------------

def test_compiled_atoms_keep_page_and_section_and_ask_explains_them(tmp_path, tiny_models):
    from microlora.cli import cli
    from store import AdapterStore

    lm, emb = tiny_models
    models = ["--base-model", str(lm), "--embedder", str(emb)]
    store = tmp_path / "kb"
    pdf = str(DATA / "report.pdf")
    args = ["compile", pdf, str(DATA / "notes.docx"), "--store", str(store), *models,
            "--last-layers", "2", "--steps", "2"]
    dry = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "report.pdf:" in dry.output  # its id: the file's name, as it was given alone
    assert " p. 2, Results  'Year: 2019, Revenue: 4.1 M" in dry.output
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0 and "2 documents, 16 atoms: 16 trained" in done.output, done.output
    with AdapterStore(store, readonly=True) as s, s.read("default") as reader:
        records = {r.text: r for _, r in reader.items()}
    row = records["Year: 2019, Revenue: 4.1 M, Clocks: 19"]
    assert (row.source, row.page, row.section) == ("report.pdf", 2, ["Results"])
    assert row.context == ["Year: 2018, Revenue: 3.2 M, Clocks: 14", row.text]
    tide = records["Spring tides lift the water by four metres at the harbour mouth."]
    assert (tide.page, tide.section) == (0, ["Harbour survey", "Tides"])

    ask = ["ask", "Which cathedral?", "--store", str(store), *models, "-k", "8",
           "--max-new-tokens", "2"]
    explained = CliRunner().invoke(cli, [*ask, "--explain"])
    assert explained.exit_code == 0, explained.output
    lines = [line for line in explained.output.splitlines() if "[default]" in line]
    assert len(lines) == 8
    for line in lines:
        text = line.split("  ")[-1].strip("'\"")
        record = next(r for t, r in records.items() if t.startswith(text))
        assert cite(record.source, record.page, record.section, record.start,
                    record.end) in line
    answer = json.loads(CliRunner().invoke(cli, [*ask, "--json"]).stdout)
    for source in answer["sources"]:
        record = records[source["text"]]
        assert source["page"] == (record.page or None) and source["section"] == record.section
        assert source["citation"] == cite(record.source, record.page, record.section)


def test_jsonl_rows_split_only_at_newlines_and_a_bom_keeps_row_one(tmp_path):
    # U+2028, U+2029 and U+0085 are legal inside a JSON string: str.splitlines() broke the row
    # there, and later line numbers shifted; a BOM made row 1 invalid JSON.
    rows = [{"text": "First row."}, {"text": "Line\u2028separator and\u2029paragraph."},
            {"text": "Next\u0085line."}, {"text": "Windows ending."}, {"text": ""}]
    body = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    (tmp_path / "rows.jsonl").write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    docs, skipped = read_documents([tmp_path / "rows.jsonl"])
    where = str(tmp_path / "rows.jsonl")
    assert [(d.source, d.text) for d in docs] == [
        ("rows.jsonl:1", "First row."), ("rows.jsonl:2", "Line\u2028separator and\u2029paragraph."),
        ("rows.jsonl:3", "Next\u0085line."), ("rows.jsonl:4", "Windows ending.")]
    assert [s.source for s in skipped] == [f"{where}:5"]


def test_a_bom_is_stripped_for_every_text_format(tmp_path):
    # and a Markdown line ends at \n or \r only: "# Not" after U+2028 is no heading
    (tmp_path / "a.md").write_bytes("\ufeff# Title\n\nSome text.\u2028# Not a heading".encode())
    (tmp_path / "b.txt").write_bytes("\ufeffPlain text.".encode())
    docs, skipped = read_documents([tmp_path])
    assert skipped == []
    assert [(d.text[:1], d.title) for d in docs] == [("#", "Title"), ("P", "")]
    assert docs[0].sections == ((0, ("Title",)),)


def test_extensions_match_whatever_their_case(tmp_path):
    (tmp_path / "upper.MD").write_text("# Upper\n\nA sentence.")
    (tmp_path / "rows.JSONL").write_text('{"text": "A row."}\n')
    (tmp_path / "notes.Txt").write_text("Some notes.")
    named, skipped = read_documents(sorted(tmp_path.iterdir()))
    assert skipped == [] and len(named) == 3
    found, skipped = read_documents([tmp_path])
    assert skipped == [] and [d.text for d in found] == [d.text for d in named]
    assert named[2].title == "Upper"


def test_a_document_survives_json_with_its_blocks_sections_and_pages():
    doc = read_documents([DATA / "report.pdf"])[0][0]
    assert doc.blocks and doc.sections and doc.pages
    again = Document.from_json(json.loads(json.dumps(doc.to_json())))
    assert again == doc and chunk_document(again, TOK) == chunk_document(doc, TOK)
