"""Completions logprobs.text_offset: each token's offset is the length of the returned text before it (vLLM's rule),
also when a token leaves a character unfinished."""
import pytest

pytest.importorskip("pydantic")  # the server's request models: a project requirement, absent from the GPU image

from deltaserve.serve.serving import TextOffsets  # noqa: E402

_PIECES = {  # token id -> its bytes: byte-level tokens may hold part of a character
    1: b"\xe4", 2: b"\xb8", 3: b"\xad", 4: b"ges", 5: b"x", 6: b"\xe4\xb8", 7: b"<|im_end|>", 8: b"\xf0\x9f",
}


def _offsets(ids, skip=frozenset()):
    offsets = TextOffsets(lambda t: (_PIECES[t].decode("utf-8", "replace"), list(_PIECES[t])), skip=skip)
    return [offsets.take(t) for t in ids]


CASES = [  # (name, token ids, the returned text, offsets)
    ("ascii", [5, 4, 5], "xgesx", [0, 1, 4]),
    ("character_over_three_tokens", [1, 2, 3, 4], "中ges", [0, 0, 0, 1]),
    ("cut_character_then_text", [1, 4], "\ufffdges", [0, 1]),
    ("cut_two_bytes_then_text", [6, 4], "\ufffdges", [0, 1]),
    ("text_cut_character_text", [5, 1, 5], "x\ufffdx", [0, 1, 2]),
    ("cut_character_then_a_new_one", [1, 6, 3], "\ufffd中", [0, 1, 1]),
    ("two_cut_characters", [1, 8, 4], "\ufffd\ufffdges", [0, 1, 2]),
    ("cut_character_then_special", [1, 7], "\ufffd<|im_end|>", [0, 1]),
]


@pytest.mark.parametrize("ids, text, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_offsets_are_the_running_length_of_the_returned_text(ids, text, expected):
    assert b"".join(_PIECES[t] for t in ids).decode("utf-8", "replace") == text  # the text the response returns
    got = _offsets(ids)
    assert got == expected, got
    assert all(0 <= at <= len(text) for at in got)


def test_a_skipped_special_token_adds_nothing_and_the_cut_character_still_counts():
    assert _offsets([1, 7, 4], skip={7}) == [0, 0, 1]
