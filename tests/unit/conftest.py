"""Fixtures shared by the unit tests of the tokenizer and the chat prompt (test_tokenizer.py,
test_chat_template_parity.py)."""
import pytest

from deltaserve.tokenizer import Tokenizer, train_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The tokenizer and chat template make_tiny ships, in a folder of their own."""
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tiny_tokenizer(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
