"""A --calib file that holds no usable text is refused in one sentence naming --calib, before the 16-bit model is
loaded for the calibration run, and before DST is created."""
import pytest

import deltaserve.llm
from deltaserve.quantize import quantize_checkpoint
from deltaserve.tiny import make_tiny


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("src") / "dense"))


@pytest.mark.parametrize("content, needle", [
    (b"", "holds no text"),
    (b"  \n\n\t  \n", "holds no text"),
    (b"\xef\xbb\xbf", "holds no text"),  # a byte-order mark alone
    (b"\x00" * 4096, r"is not a text file \(it holds NUL bytes"),  # a zero-filled file is valid UTF-8
    ("some text".encode("utf-16-le"), r"is not a text file \(it holds NUL bytes"),  # UTF-16 without a BOM, too
    (b"\x80\xb7" * 100, "is not UTF-8 text"),
], ids=["empty", "whitespace", "bom", "zeros", "utf16", "binary"])
def test_calib_without_text_is_one_sentence_before_any_work(content, needle, src, tmp_path, monkeypatch):
    def no_model(*a, **kw):
        raise AssertionError("the model was loaded for a calibration file without text")

    monkeypatch.setattr(deltaserve.llm, "LLM", no_model)
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^--calib \S*calib.txt {needle}") as e:
        quantize_checkpoint(src, str(tmp_path / "q"), group_size=64, calib=str(calib), progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "q").exists()


def test_text_with_a_byte_order_mark_still_calibrates(src, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_bytes("\ufeffThe quick brown fox jumps over the lazy dog. ".encode("utf-8") * 20)
    quantize_checkpoint(src, str(tmp_path / "q"), group_size=64, calib=str(calib), progress=False)
    assert (tmp_path / "q" / "config.json").exists()
