"""The loss builds logits only where there is a target (train.token_loss_sum) or a review
token to score (task.polarity.review_log_prob), and gets the very numbers, gradients included,
that logits at every position gave."""
import copy

import pytest
import torch
import torch.nn.functional as F

import data
import task.generation
import task.polarity
import train
from corpus import features as corpus_features
from corpus import read as corpus_read
from model import load_model, load_tokenizer, packs_reviews, splits_off_output_layer


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def features(tokenizer):
    texts = [" ".join(["정말", "최고", "영화", "별로"][: 1 + i % 4] * (1 + i % 5)) for i in range(12)]
    return corpus_features.encode(
        corpus_read.Reviews(texts, [i % 2 for i in range(12)]), tokenizer, 16
    )


def full_logits_loss_sum(model, batch):
    """The loss as it was: logits at every position, padding and the last one included."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=-100, reduction="sum")


def test_the_loss_and_its_gradients_are_those_of_logits_everywhere(tiny_model, tokenizer,
                                                                   features):
    batch = data.ReviewBatches(features, tokenizer.pad_token_id, False, 12)[list(range(12))]
    real = batch["attention_mask"].bool()
    assert not real.all()  # padding to skip
    # Exactly the positions followed by a real token: neither padding nor the last one.
    assert len(batch["target_positions"]) == int(train.count_targets(batch))
    model = load_model(str(tiny_model), tokenizer).eval()  # no dropout: one function
    assert splits_off_output_layer(model)  # GPT-2: the gathering path is the one tested
    reference = copy.deepcopy(model)
    loss = train.token_loss_sum(model, batch)
    expected = full_logits_loss_sum(reference, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    expected.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_fixed_shape_batches_give_the_same_loss(tiny_model, tokenizer, features):
    model = load_model(str(tiny_model), tokenizer).eval()
    cut, fixed = (data.ReviewBatches(features, tokenizer.pad_token_id, fixed, 16)[list(range(12))]
                  for fixed in (False, True))
    assert "target_positions" not in fixed  # XLA: the whole rectangle, one shape
    with torch.no_grad():
        torch.testing.assert_close(train.token_loss_sum(model, cut),
                                   train.token_loss_sum(model, fixed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_batches_train_what_padded_batches_train(tiny_model, tokenizer, features,
                                                        attention):
    # Reviews end to end in fewer rows, each seeing only itself: the same loss and the
    # same gradients as the padded batch, with either attention transformers offers.
    model = load_model(str(tiny_model), tokenizer).eval()
    model.config._attn_implementation = attention
    del model.packing_works
    assert packs_reviews(model)
    reference = copy.deepcopy(model)
    for fixed in (False, True):
        padded, packed = (data.ReviewBatches(features, tokenizer.pad_token_id, fixed, 12,
                                             packed)[list(range(12))] for packed in (False, True))
        assert packed["input_ids"].numel() < padded["input_ids"].numel()
        assert int(train.count_targets(packed)) == int(train.count_targets(padded))
        loss = train.token_loss_sum(model, packed)
        expected = full_logits_loss_sum(reference, padded)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        model.zero_grad()
        reference.zero_grad()
        loss.backward()
        expected.backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_a_model_that_cannot_pack_is_found_out(tiny_model, tokenizer):
    # A model that ignores position_ids: packed rows would give its reviews other positions.
    model = load_model(str(tiny_model), tokenizer)
    forward = model.forward
    model.forward = lambda position_ids=None, **inputs: forward(**inputs)
    del model.packing_works
    assert not packs_reviews(model)


def test_review_scores_are_the_same_with_and_without_fixed_shapes(tiny_model, tokenizer,
                                                                  features):
    model = load_model(str(tiny_model), tokenizer).eval()
    prefix = task.generation.prompt_ids(tokenizer, "긍정")
    scores = []
    for fixed in (False, True):
        dataset = task.polarity.PolarityBatches(features, tokenizer, None, fixed, 12)
        with torch.no_grad():
            scores.append(task.polarity.review_log_prob(model, prefix, dataset[list(range(12))]))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-5)


def test_a_model_whose_head_is_more_than_its_output_layer_uses_its_own_logits(tiny_model,
                                                                              tokenizer,
                                                                              features):
    # A model that transforms the hidden states before its output layer (BERT as a decoder
    # does) is found out at load, and the loss takes the model's own logits: it stays right.
    model = load_model(str(tiny_model), tokenizer).eval()
    reference = copy.deepcopy(model)
    output_layer = model.lm_head
    model.lm_head = torch.nn.Sequential(torch.nn.Tanh(), output_layer)
    model.get_output_embeddings = lambda: output_layer
    del model.output_layer_splits_off
    assert not splits_off_output_layer(model)
    batch = data.ReviewBatches(features, tokenizer.pad_token_id, False, 12)[list(range(12))]
    with torch.no_grad():
        torch.testing.assert_close(train.token_loss_sum(model, batch),
                                   full_logits_loss_sum(model, batch), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(train.token_loss_sum(model, batch),
                                  train.token_loss_sum(reference, batch))
