"""How the committed document fixtures were made, with each format's own writer.

    pip install fpdf2 pypdf python-docx python-pptx ebooklib
    python tests/data/make_fixtures.py

The files are committed, so the tests need none of the writers. site.html is written by hand
(beside this script). The facts are invented, so a model cannot know them closed book.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER = "Brightwater Clockworks - Annual Report 2019"

PAGE_1 = [
    ("h1", "Introduction"),
    ("p", "Brightwater Clockworks builds tower clocks in the town of Ostrel. The company was "
          "founded in 1911 by Ada Quenby, a watchmaker from Kinsley."),
    # an explicit line break after a hyphen: a word hyphenated at the line end
    ("p", "The board publishes this infor-\nmation every spring for the people of Ostrel."),
    ("h2", "Workshop"),
    ("p", "The workshop keeps its original steam lathe in working order. Twelve apprentices "
          "trained there during the year."),
]
PAGE_2 = [
    ("h1", "Results"),
    ("p", "The largest clock of the year was built for the cathedral of Velmora and weighs "
          "four tonnes. Most other clocks went to railway stations in the north."),
    ("table", [("Year", "Revenue", "Clocks"), ("2018", "3.2 M", "14"), ("2019", "4.1 M", "19")]),
    ("p", "Revenue is given in millions of euros, before tax."),
]


def make_pdf(path: Path) -> None:
    from fpdf import FPDF

    class Report(FPDF):
        def header(self) -> None:
            self.set_font("Helvetica", "", 9)
            self.cell(0, 8, HEADER, align="C")
            self.ln(14)

        def footer(self) -> None:
            self.set_y(-15)
            self.set_font("Helvetica", "", 9)
            self.cell(0, 8, f"Page {self.page_no()} of {{nb}}", align="C")

    pdf = Report(format="A4")
    pdf.set_auto_page_break(True, margin=20)
    for page in (PAGE_1, PAGE_2):
        pdf.add_page()
        for kind, body in page:
            if kind == "table":
                pdf.set_font("Helvetica", "", 11)
                with pdf.table(width=120, align="LEFT") as table:
                    for row in body:
                        cells = table.row()
                        for cell in row:
                            cells.cell(cell)
                pdf.ln(4)
                continue
            size = {"h1": 18, "h2": 14}.get(kind, 11)
            pdf.set_font("Helvetica", "B" if kind != "p" else "", size)
            pdf.multi_cell(0, size * 0.5, body)
            pdf.ln(3)
    pdf.output(str(path))


def make_encrypted_pdf(source: Path, path: Path) -> None:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(source))
    writer.encrypt(user_password="secret", algorithm="RC4-128")
    writer.write(path)


def make_scanned_pdf(path: Path) -> None:
    """A page with a drawing and no text layer, as a scan without OCR is."""
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.add_page()
    pdf.rect(20, 20, 170, 250, style="F")
    pdf.output(str(path))


def make_docx(path: Path) -> None:
    import docx

    d = docx.Document()
    d.core_properties.title = "Field notes"
    d.add_heading("Field notes", level=0)
    d.add_heading("Harbour survey", level=1)
    d.add_paragraph("The harbour of Ostrel was surveyed in May by the crew of the Marguerite. "
                    "Its deepest berth lies beside the old grain quay.")
    d.add_paragraph("")  # an empty paragraph, as Word documents are full of
    d.add_heading("Tides", level=2)
    d.add_paragraph("Spring tides lift the water by four metres at the harbour mouth.")
    table = d.add_table(rows=3, cols=2)
    for r, row in enumerate([("Station", "Depth"), ("North pier", "7.5 m"),
                             ("Grain quay", "11.2 m")]):
        for c, text in enumerate(row):
            table.cell(r, c).text = text
    d.add_heading("Lighthouse", level=1)
    d.add_paragraph("The lighthouse keeper, Tomas Vey, has kept the light since 1987.")
    d.save(str(path))


def make_pptx(path: Path) -> None:
    from pptx import Presentation

    deck = Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[1])  # title and content
    slide.shapes.title.text = "Quarterly review"
    slide.placeholders[1].text = "Orders for tower clocks doubled in the third quarter."
    slide = deck.slides.add_slide(deck.slide_layouts[1])
    slide.shapes.title.text = "Next steps"
    slide.placeholders[1].text = "A second workshop opens in Velmora next spring."
    deck.save(str(path))


def make_epub(path: Path) -> None:
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("microlora-fixture")
    book.set_title("The Clockmaker")
    book.set_language("en")
    chapters = []
    for i, (title, text) in enumerate([
        ("The workshop", "Ada Quenby opened her workshop in Ostrel in the spring of 1911."),
        ("The cathedral", "Her last clock was hung in the cathedral tower of Velmora."),
    ], start=1):
        chapter = epub.EpubHtml(title=title, file_name=f"chapter{i}.xhtml", lang="en")
        chapter.content = f"<h1>{title}</h1><p>{text}</p>"
        book.add_item(chapter)
        chapters.append(chapter)
    book.toc = chapters
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = ["nav", *chapters]
    epub.write_epub(str(path), book)


if __name__ == "__main__":
    make_pdf(HERE / "report.pdf")
    make_encrypted_pdf(HERE / "report.pdf", HERE / "encrypted.pdf")
    make_scanned_pdf(HERE / "scanned.pdf")
    make_docx(HERE / "notes.docx")
    make_pptx(HERE / "deck.pptx")
    make_epub(HERE / "book.epub")
