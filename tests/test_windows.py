"""Windows: an atom's sentence and its paragraph around it, within a token budget, merged
across atoms of one paragraph so nothing is shown twice."""

from composer.windows import merge
from microlora.core.windows import window

PARAGRAPH = ["Talia Orven grew up in Mossbeck.", "She trained as a glassblower.",
             "She later founded a glassworks in Carrow Point.", "It closed in 1904.",
             "Mossbeck is on the river Ule."]


def words(text: str) -> int:
    return len(text.split())


def test_a_window_grows_around_its_atom_earlier_sentences_first():
    assert window(PARAGRAPH, 2, 0, words) == [PARAGRAPH[2]]  # 0: the sentence alone
    assert window(PARAGRAPH, 2, 13, words) == PARAGRAPH[1:3]  # 8 + 5 words; +4 would be 17
    assert window(PARAGRAPH, 2, 17, words) == PARAGRAPH[1:4]
    assert window(PARAGRAPH, 2, 1000, words) == PARAGRAPH
    assert window(PARAGRAPH, 0, 3, words) == [PARAGRAPH[0]]  # the atom even over budget


def test_a_window_takes_a_later_sentence_when_an_earlier_one_does_not_fit():
    long_first = ["one two three four five six seven eight nine ten"] + PARAGRAPH[3:]
    assert window(long_first, 1, 10, words) == long_first[1:]  # 4 + 6; the first is 10


def test_overlapping_windows_merge_and_keep_rank_order():
    a, b = PARAGRAPH[2:4], PARAGRAPH[0:3]  # b ranks second but starts earlier
    other = ["An unrelated sentence from elsewhere."]
    assert merge([a, other, b]) == [PARAGRAPH[0:4], other]
    assert merge([a, a]) == [a]
    assert merge([PARAGRAPH[0:1], PARAGRAPH[3:4]]) == [PARAGRAPH[0:1], PARAGRAPH[3:4]]
