"""Writing reviews of a polarity, as training taught the model: `긍정 prompt` tokenized
without special tokens, with no token_type_ids, continued until `</s>`; optionally steered
towards its polarity by classifier-free guidance. Control accuracy is the share of the
reviews written that an independent judge (judge.py) finds in the polarity asked for.
"""
import torch

from corpus.features import POLARITY, prompt_token_ids
from runtime.errors import InputError
from task import GUIDANCE, SAMPLING

SAMPLE_TOKENS = 20  # the most tokens of each short review that train.py's evaluations show


def prompt_ids(tokenizer, polarity, prompt=""):
    """Token ids [1, n] that start a review the way training started one: `polarity prompt`
    with no special tokens. With no prompt the polarity word stands alone: `"긍정 "` would
    add a token for the trailing space, which training never put there."""
    text = f"{polarity} {prompt.strip()}".strip()
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def other_word(polarity):
    """The polarity word that is not `polarity`."""
    return next(word for word in POLARITY.values() if word != polarity)


def prompt_length(tokenizer, words, prompt="", guidance=1.0):
    """The tokens before the first one written: the longest of `words` (polarity words, or
    "" for none) with `prompt`. Guidance runs the other word with the prompt beside them, in
    the same positions, so under guidance it counts too."""
    if guidance != 1:
        words = [*words, *(other_word(word) for word in words if word)]
    return max(prompt_ids(tokenizer, word, prompt).shape[1] for word in words)


def check_fits(positions, given, more, what, after, fix):
    """The one check of the model's positions, made by every path that runs the model past
    a training row (generate.py, and train.py's evaluations through NsmcTask.prepare) before
    its first step: `given` tokens (the prompt) followed by `more` (what is written or
    scored after it) must fit the model's `positions`. GPT-2 learns an embedding for each of
    its n_positions positions and has none beyond, so past them `generate` or a forward pass
    fails deep in torch (an IndexError, on a GPU a device assert), maybe hours into a run.

    The refusal is one line: "`what` does not fit the model's P positions after `after`;
    `fix`", `fix` formatted with `room`, the most tokens that fit after the prompt, and
    `need`, the positions the model would need. `positions` None: a model without learned
    positions, nothing to check."""
    if positions and given + more > positions:
        after = f" after {after}" if after else ""
        raise InputError(f"{what} does not fit the model's {positions} positions{after}; "
                         f"{fix.format(room=positions - given, need=given + more)}")


def tokens(n):
    return f"{n} token" if n == 1 else f"{n} tokens"


def guidance_arguments(tokenizer, polarity, prompt, guidance, rows, device):
    """`generate`'s arguments for classifier-free guidance that contrasts `polarity` with
    the other word: the next token's log-probabilities become
    u + guidance * (c - u), c given `polarity prompt` and u given `other prompt`.
    transformers runs the other word's branch itself, with a cache of its own, one row per
    sequence generated (it does not expand the negative prompt to num_return_sequences)."""
    if guidance == 1 or not polarity:  # no other word to contrast with a model without labels
        return {}
    negative = prompt_ids(tokenizer, other_word(polarity), prompt).to(device).expand(rows, -1)
    return dict(guidance_scale=float(guidance), negative_prompt_ids=negative,
                negative_prompt_attention_mask=torch.ones_like(negative))


@torch.no_grad()
def write_reviews(model, tokenizer, polarity, settings, prompt="", num_samples=1, seed=0,
                  guidance=1.0):
    """`num_samples` reviews of `polarity` (a POLARITY word, or "" for a model trained
    without labels) that continue `prompt`, from one batched `generate` call, each decoded
    without the polarity word. `settings` are `generate`'s sampling arguments (SAMPLING);
    `guidance` above 1 steers the reviews towards `polarity` (see `guidance_arguments`).

    Temperature 0 is greedy decoding, the likeliest token each time: it has no randomness,
    so it writes one review whatever `num_samples`, and temperature, top_k and top_p have
    nothing to act on (they are left out: transformers refuses or warns about them).

    The same seed gives the same reviews, and the caller's random state is left as it
    was, so that training goes on exactly as if no samples had been drawn."""
    greedy, settings = decoding(settings)
    if greedy:
        num_samples = 1
    input_ids = prompt_ids(tokenizer, polarity, prompt).to(model.device)
    guided = guidance_arguments(tokenizer, polarity, prompt, guidance, num_samples, model.device)
    cuda = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                do_sample=not greedy, num_return_sequences=num_samples,
                                eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, **guided, **settings)
    # Whitespace splits the polarity word from the prompt, so it is the same tokens alone.
    skip = prompt_ids(tokenizer, polarity).shape[1] if polarity else 0
    return [tokenizer.decode(row[skip:], skip_special_tokens=True).strip() for row in output]


def decoding(settings):
    """(greedy, `settings` for `generate`): temperature 0 is greedy decoding, and the
    arguments it has no use for are left out (transformers refuses or warns about them)."""
    greedy = settings.get("temperature") == 0
    if greedy:
        settings = {name: value for name, value in settings.items()
                    if name not in ("temperature", "top_k", "top_p")}
    return greedy, settings


def response_prompt_ids(tokenizer, prompts):
    """Each prompt's token ids as training tokenized the prompt of a pair
    (corpus.features): alone, without special tokens, not stripped, and here never cut."""
    return prompt_token_ids(prompts, tokenizer, max_length=2**31 - 1)


@torch.no_grad()
def write_responses(model, tokenizer, prompts_ids, settings, seed=0):
    """The response to each prompt (token id lists, see `response_prompt_ids`): the new
    tokens only, up to `</s>`, from one `generate` call over the prompts left-padded to one
    width (the attention mask hides the padding, and transformers numbers each row's
    positions from its first real token, so a prompt's response does not depend on the
    others in its batch). Seeded and leaving the random state alone, as `write_reviews`."""
    greedy, settings = decoding(settings)
    width = max(len(ids) for ids in prompts_ids)
    input_ids = torch.full((len(prompts_ids), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    cuda = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        output = model.generate(input_ids=input_ids.to(model.device),
                                attention_mask=attention_mask.to(model.device),
                                do_sample=not greedy, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, **settings)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]


def reproduced_share(model, tokenizer, features, indices, batch_size):
    """(share, count): of the examples `indices` of `features` that have an untrained
    prompt, the share whose response greedy decoding writes exactly (as text, up to
    `</s>`), each from its prompt's tokens as training cut them."""
    ids, lengths, starts = features.input_ids, features.lengths, features.trained_from
    asked = [i for i in indices if starts is not None and starts[i] > 0]
    same = 0
    for first in range(0, len(asked), batch_size):
        batch = asked[first:first + batch_size]
        wanted = [tokenizer.decode(ids[i, starts[i]:lengths[i] - 1],
                                   skip_special_tokens=True).strip() for i in batch]
        longest = max(int(lengths[i] - starts[i]) for i in batch)  # the response and </s>
        written = write_responses(model, tokenizer, [ids[i, :starts[i]].tolist() for i in batch],
                                  {"temperature": 0, "max_new_tokens": longest})
        same += sum(w == r for w, r in zip(written, wanted))
    return (same / len(asked) if asked else 0.0), len(asked)


def control_accuracy(model, tokenizer, judge_, num_samples, seed, guidance=GUIDANCE,
                     settings=SAMPLING):
    """The share of `num_samples` reviews written for each polarity that `judge_` (see
    judge.py) finds in the polarity asked for; also the reviews, by label."""
    reviews = {label: write_reviews(model, tokenizer, word, settings, "", num_samples, seed,
                                    guidance)
               for label, word in POLARITY.items()}
    right = sum(predicted == label for label, texts in reviews.items()
                for predicted in judge_.predict(texts))
    return right / sum(len(texts) for texts in reviews.values()), reviews


def one_review_each(model, tokenizer, seed, max_new_tokens=SAMPLE_TOKENS, guidance=GUIDANCE):
    """One short review of each polarity, as train.py shows at each evaluation."""
    settings = {**SAMPLING, "max_new_tokens": max_new_tokens}
    return {word: write_reviews(model, tokenizer, word, settings, seed=seed, guidance=guidance)[0]
            for word in POLARITY.values()}
