"""Reading documents and cutting them into atoms."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from compiler.chunking import chunk_document
from compiler.documents import Document, read_documents
from microlora.core.config import ChunkConfig


def word_tokenizer():
    """Whitespace/punctuation tokens: token counts are easy to reason about in tests."""
    tok = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


TOK = word_tokenizer()
TEXT = ("Madge Blake was born in Kinsley, Kansas. She moved to California in 1900.\n\n"
        "# Career\n\nDr. Smith met J. R. R. Tolkien at Oxford. See below.\n"
        "Her first film role came in 1950, at the age of 51.")


def atoms_of(text, **kw):
    return chunk_document(Document("doc.txt", text), TOK, ChunkConfig(**kw))


def test_one_sentence_per_atom_with_exact_offsets():
    atoms = atoms_of(TEXT)
    assert [a.text for a in atoms] == [
        "Madge Blake was born in Kinsley, Kansas.",
        "She moved to California in 1900.",
        "# Career\n\nDr. Smith met J. R. R. Tolkien at Oxford.",  # heading joins across
        "See below.\nHer first film role came in 1950, at the age of 51.",
    ]
    for a in atoms:
        assert TEXT[a.start:a.end] == a.text and a.source == "doc.txt"


def test_each_atom_keeps_its_paragraph_as_context():
    atoms = atoms_of(TEXT)
    first, second, heading, last = atoms
    assert first.context == second.context == (first.text, second.text)
    assert (first.at, second.at) == (0, 1)
    # the heading joined the sentence it heads, whose paragraph it now belongs to
    assert heading.context == last.context == (heading.text, last.text) and last.at == 1


def test_context_is_capped_around_the_atom_in_a_long_paragraph():
    from compiler.chunking import CONTEXT_ATOMS

    text = " ".join(f"This is sentence number {i} of one long paragraph." for i in range(40))
    atoms = atoms_of(text)
    middle = atoms[20]
    assert len(middle.context) == 2 * CONTEXT_ATOMS + 1
    assert middle.context[middle.at] == middle.text
    assert middle.context[0] == atoms[20 - CONTEXT_ATOMS].text


def test_long_sentences_split_at_clauses_then_tokens():
    clauses = ", ".join(f"clause number {i} has five words" for i in range(12)) + "."
    atoms = atoms_of(clauses, max_tokens=16)
    assert len(atoms) > 1
    assert all(len(a.text.split()) <= 16 for a in atoms)
    assert all(a.text.endswith((",", ".")) for a in atoms)  # cut after a comma, not mid-clause
    run_on = " ".join(f"w{i}" for i in range(50)) + "."
    atoms = atoms_of(run_on, max_tokens=16)
    assert [len(a.text.split()) for a in atoms] == [16, 16, 16, 2]


sentence = st.builds(lambda body, end: body.strip() + end,
                     st.text(st.sampled_from("abcdefgh XYZ,;"), min_size=1, max_size=60),
                     st.sampled_from(".!?"))
documents = st.lists(st.tuples(sentence, st.sampled_from([" ", "  ", "\n", "\n\n"])),
                     min_size=1, max_size=12).map(lambda parts: "".join(s + w for s, w in parts))


@settings(max_examples=60, deadline=None)
@given(documents, st.integers(8, 20), st.integers(0, 40))
def test_chunker_invariants(text, max_tokens, min_chars):
    atoms = atoms_of(text, max_tokens=max_tokens, min_chars=min_chars)
    covered = set()
    for a in atoms:
        assert text[a.start:a.end] == a.text and a.text == a.text.strip() and a.text
        assert len(TOK(a.text, add_special_tokens=False)["input_ids"]) <= max_tokens
        covered.update(range(a.start, a.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())
    assert [a.start for a in atoms] == sorted(a.start for a in atoms)
    assert all(x.end <= y.start for x, y in zip(atoms, atoms[1:]))


def test_read_documents_reports_bad_inputs_and_keeps_the_rest(tmp_path):
    (tmp_path / "good.txt").write_text("A fine fact about Kinsley.")
    (tmp_path / "notes.md").write_text("# Kansas\n\nKinsley is in Kansas.")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02abc")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "big.txt").write_bytes(b"a" * (2 * 2**20))
    (tmp_path / "rows.jsonl").write_text("\n".join([
        json.dumps({"id": "q1", "title": "Madge", "text": "Madge was born in 1899."}),
        "{not json",
        json.dumps({"id": "q2"}),
        json.dumps({"text": "Row without id."}),
    ]))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF")
    (tmp_path / "ignored.xls").write_bytes(b"\xd0\xcf")
    (tmp_path / "nothing").mkdir()
    docs, skipped = read_documents([tmp_path, tmp_path / "missing.txt", tmp_path / "nothing",
                                    tmp_path / "ignored.xls"], max_file_mb=1)
    by_source = {d.source: d for d in docs}  # relative to the directory given
    assert set(by_source) == {"good.txt", "notes.md", "rows.jsonl#q1", "rows.jsonl:4"}
    assert by_source["notes.md"].title == "Kansas"
    assert by_source["rows.jsonl#q1"].title == "Madge"
    reasons = {s.source.replace(str(tmp_path), ""): s.reason for s in skipped}
    assert reasons["/empty.txt"] == "empty file"
    assert reasons["/binary.txt"].startswith("binary file")
    assert reasons["/latin1.txt"].startswith("not UTF-8 (invalid byte at offset 3)")
    assert "over the 1 MB limit" in reasons["/big.txt"]
    assert "not valid JSON" in reasons["/rows.jsonl:2"]
    assert '"text"' in reasons["/rows.jsonl:3"]
    assert reasons["/missing.txt"] == "no such file or directory"
    assert reasons["/nothing"].startswith("no .txt, .md, .jsonl, .pdf, .html")
    assert reasons["/broken.pdf"].startswith("not a readable PDF")
    assert reasons["/ignored.xls"].startswith("unsupported file type .xls")


@pytest.mark.parametrize("bad", [0, 7])
def test_chunk_config_names_the_flag(bad):
    with pytest.raises(ValueError, match="--max-atom-tokens"):
        ChunkConfig(max_tokens=bad)
    with pytest.raises(ValueError, match="--atom-sentences"):
        ChunkConfig(sentences=bad - 7)


def test_an_atom_of_several_sentences_never_crosses_a_paragraph():
    atoms = atoms_of(TEXT, sentences=3)
    assert [a.text for a in atoms] == [
        "Madge Blake was born in Kinsley, Kansas. She moved to California in 1900.",
        "# Career\n\nDr. Smith met J. R. R. Tolkien at Oxford. See below.\n"
        "Her first film role came in 1950, at the age of 51.",
    ]
    first, second = atoms
    def sentences(atom):
        return [atom.text[s:e] for s, e in atom.parts]

    assert sentences(first) == ["Madge Blake was born in Kinsley, Kansas.",
                                "She moved to California in 1900."]
    assert sentences(second)[1].startswith("See below.")
    assert all(TEXT[a.start:a.end] == a.text for a in atoms)
    assert first.context == (first.text,) and first.at == 0
    assert atoms_of(TEXT)[0].parts == ()  # one sentence: no parts


def test_each_sentence_of_an_atom_gets_its_own_question_views():
    from compiler.lessons import lesson_views
    from microlora.core.config import TrainConfig

    first = atoms_of(TEXT, sentences=2)[0]
    answers = [a for _, a in lesson_views(first, TrainConfig(qa_views=1))]
    assert answers == [" Madge Blake\n", " California\n"]  # one view from each sentence
    # an opening pronoun resolved moves the sentences after it: still cut where they are
    text = "Madge Blake sang in Lisk. Reviews were kind. She moved to Kinsley. It had 5000 people."
    resolving = TrainConfig(qa_views=1, resolve_pronouns=True)
    views = lesson_views(atoms_of(text, sentences=2, min_chars=10)[1], resolving)
    assert [a for _, a in views] == [" Madge Blake\n", " 5000\n"]
    assert views[1][0].startswith("Question: It had how many people")


class CountingText(str):
    """A document text that counts every character read out of it by indexing or slicing:
    the work a splitter written in Python does on it."""

    read = 0

    def __getitem__(self, key):
        piece = super().__getitem__(key)
        CountingText.read += len(piece)
        return piece


def characters_read(text: str) -> int:
    CountingText.read = 0
    atoms = chunk_document(Document("doc.txt", CountingText(text)), TOK, ChunkConfig())
    assert "".join(a.text for a in atoms).replace(" ", "") == text.replace(" ", "")
    return CountingText.read


@pytest.mark.parametrize("unit", ["a. ", "J. ", "Dr. x ", "no.  ", "x.\u2019 y. ", ".. ",
                                  "word. " * 3 + "a. " * 5])
def test_the_splitter_is_linear(unit):
    """Four times the text, at most about four times the characters read, tokenizer input
    included (the old splitter re-read each sentence from its start at every candidate end:
    16 times, for "a. ")."""
    n = 2000
    small, large = characters_read(unit * n), characters_read(unit * 4 * n)
    assert small > 0 and large <= 4.2 * small, (small, large)


def _reference_sentences(text, start, end):
    """The splitter as it was (quadratic), to check the linear one splits the same way."""
    import re

    from compiler.chunking import _ABBREVIATIONS, _strip

    out, s = [], start
    for m in re.compile(r"""[.!?…]+["'”’)\]]*(?=\s)""").finditer(text, start, end):
        word = text[s:m.start()].rsplit(None, 1)[-1].lower() if text[s:m.start()].strip() else ""
        if text[m.start()] == "." and (word in _ABBREVIATIONS or (len(word) == 1 and
                                                                  word.isalpha())):
            continue
        out.append(_strip(text, s, m.end()))
        s = m.end()
    out.append(_strip(text, s, end))
    return [x for x in out if x[0] < x[1]]


PIECES = ["a", "b", "J", "Dr", "no", "approx", "approxi", "e.g", "İ", ".", "..", "!", "?",
          "…", "'", "”", ")", "]", " ", "  ", "\n", "\t", "3"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=60).map("".join))
def test_the_linear_splitter_splits_as_before(text):
    from compiler.chunking import _paragraphs, _sentences

    for start, end in _paragraphs(text, 0, len(text)) or [(0, len(text))]:
        assert _sentences(text, start, end) == _reference_sentences(text, start, end)
