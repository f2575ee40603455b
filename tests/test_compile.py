"""train.py --compile: the compiled loss is the eager one."""
import pytest
import torch

import data
import runtime.backends
from runtime.errors import InputError
import train
from corpus import features as corpus_features
from corpus import read as corpus_read
from model import load_model, load_tokenizer

pytestmark = pytest.mark.slow  # torch.compile takes tens of seconds


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_compiled_loss_sum_equals_the_eager_one(tiny_model, packed):
    tokenizer = load_tokenizer(str(tiny_model))
    texts = [" ".join(["정말"] * (1 + i % 7)) for i in range(8)]   # uneven lengths: padding
    features = corpus_features.encode(
        corpus_read.Reviews(texts, [i % 2 for i in range(8)]), tokenizer, 16
    )
    batch = data.ReviewBatches(features, tokenizer.pad_token_id, False, 8, packed)[list(range(8))]
    model = load_model(str(tiny_model), tokenizer).eval()  # no dropout: both see one function
    compiled = runtime.backends.Backend("cpu", None).compile(train.token_loss_sum)
    torch.testing.assert_close(compiled(model, batch), train.token_loss_sum(model, batch))


def test_no_working_cpp_compiler_is_one_line(monkeypatch):
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/no/such/g++"))
    compiled = runtime.backends.Backend("cpu", "fp32").compile(lambda x: x * 3 - 1)
    with pytest.raises(InputError) as error:
        compiled(torch.ones(4))
    assert str(error.value) == (
        "--compile: torch.compile failed (InvalidCxxCompiler: No working C++ compiler found in "
        "torch._inductor.config.cpp.cxx: (None, '/no/such/g++')); install a C++ compiler (g++, "
        "or name yours in CXX) or leave out --compile")
