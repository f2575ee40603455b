"""Tokenizer and model: load them from the hub or a local directory, save them in
Hugging Face format so that `from_pretrained(directory)` loads what training wrote."""
import logging
import threading
from pathlib import Path

import torch
from huggingface_hub import constants, try_to_load_from_cache
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from runtime.errors import InputError, first_line

# KoGPT2's tokenizer files do not name its special tokens; its model card passes them
# to from_pretrained. They sit at ids <s>=0 </s>=1 <usr>=2 <pad>=3 <sys>=4 <unk>=5 <mask>=6.
KOGPT2_SPECIAL_TOKENS = dict(bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                             pad_token="<pad>", mask_token="<mask>")

# What the loop needs of a model: next-token logits from input_ids and attention_mask.
CAUSAL_LM_HINT = ("use a causal language model: KoGPT2 or another of the GPT-2 family, or any "
                  "model that AutoModelForCausalLM loads and that takes input_ids and "
                  "attention_mask")


def load_tokenizer(name, flag="--pretrained_model_name"):
    """The fast tokenizer of `name` (hub name or directory) with KoGPT2's special tokens.
    `flag` is the option that named it, for error messages.

    A tokenizer whose vocabulary lacks them keeps its own; one with no pad token pads with
    its end-of-text token, which is harmless here because padding is masked by length."""
    check_loadable(name, flag)
    if Path(name).is_dir() and not (Path(name) / "tokenizer.json").is_file():
        # Without it, from_pretrained falls back to converters that fail with unrelated
        # errors (protobuf, sentencepiece, tiktoken).
        raise InputError(f"{flag} {name}: the directory has no tokenizer.json; copy the "
                         f"tokenizer files of the model it came from (tokenizer.json, "
                         f"tokenizer_config.json) into it")
    check_tokenizer_file(name, flag)
    tokenizer = from_pretrained(PreTrainedTokenizerFast, name, flag)
    vocab = tokenizer.get_vocab()
    tokenizer.add_special_tokens({role: token for role, token in KOGPT2_SPECIAL_TOKENS.items()
                                  if token in vocab})
    if tokenizer.eos_token is None:
        raise InputError(f"{flag} {name}: the tokenizer has no end-of-text "
                         f"token (KoGPT2's is </s>), so a review's end cannot be marked")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizer_file(name, flag):
    """A local tokenizer.json cut short or not UTF-8 fails inside the Rust tokenizers with
    a bare Exception: one line instead."""
    path = Path(name) / "tokenizer.json"
    if not path.is_file():
        return
    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # whatever a damaged file makes the parser raise
        raise InputError(f"{flag} {name}: tokenizer.json does not load ({first_line(e)}); "
                         f"it must be the UTF-8 JSON that save_pretrained writes: copy it "
                         f"again from the model it came from") from None


# The folder of a checkpoint that holds its weights as shards, one file or set of files per
# process, written under --fsdp (runtime/sharding.py, runtime/xla_sharding.py).
SHARDS = "shards"


def is_sharded(folder):
    """Whether the checkpoint folder holds its weights as shards (written under --fsdp)."""
    return (Path(folder) / SHARDS).is_dir()


def load_model(name, tokenizer, flag="--pretrained_model_name", device=None, resuming=False):
    """The causal LM `name`, checked to cover every id the tokenizer can produce, on
    `device` when one is given. A sharded checkpoint (--fsdp) holds no whole model: only a
    resumed run reads it, the model built here from its config and the weights loaded from
    the shards once the backend has sharded it."""
    with LOADING:
        if is_sharded(name) and resuming:
            model = from_config(AutoConfig.from_pretrained(name))
        else:
            model = from_pretrained(AutoModelForCausalLM, name, flag)
        if sees_the_future(model):
            raise InputError(f"{flag} {name}: this {model.config.model_type} model sees the "
                             f"tokens after each position, so it would learn to copy the next "
                             f"token instead of predicting it; {CAUSAL_LM_HINT}")
        # Both found here, before the model is moved or compiled.
        splits_off_output_layer(model)
        packs_reviews(model)
        if device is not None:
            model.to(device)
            # Moving to an XLA device copies each parameter, which unties GPT-2's output
            # layer from its token embedding: the two would then train apart. Tie them again.
            model.tie_weights()
    if model.config.vocab_size < len(tokenizer):
        raise InputError(f"{flag} {name}: the model knows "
                         f"{model.config.vocab_size} tokens but its tokenizer has "
                         f"{len(tokenizer)}; use the tokenizer the model was trained with")
    return model


def sees_the_future(model):
    """Whether the model's output at a position changes with the tokens after it: an
    encoder's does (BERT, unless configured as a decoder). Trained on next-token labels, it
    would copy them, with a loss that looks fine. Two prefixes, the same but for the last
    token, tell; `from_pretrained` returns the model in eval mode, without dropout."""
    mask = torch.ones(1, 3, dtype=torch.long)  # without one, transformers warns about padding
    with torch.no_grad():
        one = model(input_ids=torch.tensor([[0, 1, 2]]), attention_mask=mask).logits[0, :2]
        other = model(input_ids=torch.tensor([[0, 1, 3]]), attention_mask=mask).logits[0, :2]
    return not torch.allclose(one, other, atol=1e-4)


# The forward's keyword arguments that leave out its output layer: the last hidden states
# come back (hidden_states[-1], after the final norm), the logits at no position at all.
WITHOUT_LOGITS = dict(output_hidden_states=True, logits_to_keep=torch.empty(0, dtype=torch.long))


def output_layer_at(model, hidden, where):
    """Logits at the flat positions `where` of `hidden` [rows, columns, width] alone: the
    output layer multiplies by the whole vocabulary, a step's largest product, and only the
    positions that predict a token need it."""
    return unwrapped(model).get_output_embeddings()(hidden.flatten(0, 1)[where])


def unwrapped(model):
    """The model itself, also when DistributedDataParallel wraps it (under torchrun)."""
    return getattr(model, "module", model)


def model_inputs(model, batch):
    """The model's keyword arguments for a padded or a packed batch."""
    if "review_ids" not in batch:
        return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    use_cache=False)
    return dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=block_causal_mask(model, batch["review_ids"]), use_cache=False)


def block_causal_mask(model, review_ids):
    """[rows, 1, columns, columns]: the position in a row at column q sees column k when
    k <= q and both hold the same review (padding, review -1, sees padding: a position that
    sees nothing would turn attention's softmax into NaN). Given whole, as a 4-D mask,
    transformers uses it as it is: True where attention goes for SDPA, an additive 0 or
    -inf-like mask for the eager attention."""
    columns = review_ids.shape[1]
    causal = torch.ones(columns, columns, dtype=torch.bool, device=review_ids.device).tril()
    sees = (review_ids[:, :, None] == review_ids[:, None, :]) & causal
    sees = sees[:, None]
    if unwrapped(model).config._attn_implementation == "sdpa":
        return sees
    return torch.zeros(sees.shape, device=sees.device).masked_fill(~sees, torch.finfo().min)


def packs_reviews(model):
    """Whether the model gives a packed row the next-token log-probabilities it gives each
    review alone: true of GPT-2 and other models with learned or rotary positions and SDPA
    or eager attention. Tried once on two short inputs, without dropout, and remembered on
    the model. The bar, 0.01, is far above float32 rounding (1e-6 to 1e-4: the two paths
    run different attention kernels) and far below what a model that ignores the positions
    or the mask gets wrong (0.3 and more)."""
    if not hasattr(model, "packing_works"):
        training = model.training
        alone = [torch.tensor([[0, 1, 2]]), torch.tensor([[3, 4]])]
        row = {"input_ids": torch.tensor([[0, 1, 2, 3, 4]]),
               "review_ids": torch.tensor([[0, 0, 0, 1, 1]]),
               "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
        with torch.no_grad():
            model.eval()
            try:
                expected = torch.cat([model(input_ids=ids.to(model.device),
                                            attention_mask=torch.ones_like(ids).to(model.device),
                                            use_cache=False).logits[0] for ids in alone])
                packed = model(**model_inputs(model, {k: v.to(model.device)
                                                      for k, v in row.items()})).logits[0]
                gap = (packed.log_softmax(-1) - expected.log_softmax(-1)).abs().max()
                model.packing_works = bool(gap < 0.01)
            except (TypeError, ValueError, RuntimeError):  # no position_ids, no 4-D masks
                model.packing_works = False
        model.train(training)
    return model.packing_works


def splits_off_output_layer(model):
    """Whether the model's logits are its output layer (`get_output_embeddings`) applied to
    the last hidden states that its forward returns with WITHOUT_LOGITS: true of GPT-2 and
    most causal LMs, not of BERT as a decoder, which transforms the states first, nor of
    models whose forward has no `logits_to_keep`. Tried once on a short input, without
    dropout, and remembered on the model."""
    model = unwrapped(model)
    if not hasattr(model, "output_layer_splits_off"):
        training = model.training
        ids = torch.tensor([[0, 1, 2]], device=model.device)
        head = model.get_output_embeddings()
        with torch.no_grad():
            whole = model.eval()(input_ids=ids, use_cache=False).logits
            try:
                hidden = model(input_ids=ids, use_cache=False, **WITHOUT_LOGITS).hidden_states[-1]
                split = head(hidden) if head is not None else None
            except (TypeError, ValueError, RuntimeError):  # no logits_to_keep, say
                split = None
        model.train(training)
        model.output_layer_splits_off = (split is not None and split.shape == whole.shape
                                         and torch.allclose(split, whole, atol=1e-5))
    return model.output_layer_splits_off


def check_loadable(name, flag="--pretrained_model_name", max_seq_length=None):
    """Fail early, in one line, when `name` is neither a model directory nor reachable, is
    not a causal language model, or when `max_seq_length` is longer than the positions the
    model has. Returns those positions (None: the model has no limit we know of)."""
    config = from_pretrained(AutoConfig, name, flag)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InputError(f"{flag} {name}: a {config.model_type} model is not a causal "
                         f"language model; {CAUSAL_LM_HINT}")
    positions = max_positions(config)
    if max_seq_length and positions and max_seq_length > positions:
        raise InputError(f"--max_seq_length {max_seq_length} is longer than the {positions} "
                         f"positions of {flag} {name}; use at most {positions}")
    return positions


def max_positions(config):
    """How many positions the model has an embedding for (GPT-2 names it n_positions)."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


# `from_pretrained` is not thread-safe: while it builds a model it makes every parameter that
# any thread registers land on the "meta" device, without data. XLA replicas that are threads
# of one process (every XLA:CPU run, two per process on TPU v2/v3 hosts) therefore load, move
# and tie their models one at a time ("Cannot copy out of meta tensor" otherwise).
LOADING = threading.RLock()


def from_config(config):
    """A model of `config`'s architecture with random weights, in fp32 whatever dtype the
    config records (fp32 master weights: --precision bf16 casts only in the forward)."""
    with LOADING:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    return model.eval()


def from_pretrained(cls, name, flag):
    try:
        with LOADING:
            return cls.from_pretrained(name)
    except SafetensorError as e:  # a weights file cut short: a full disk, a copy interrupted
        damaged = damaged_weights(name) or "its model.safetensors"
        raise InputError(f"{flag} {name}: {damaged} is damaged ({first_line(e)}); delete it, "
                         f"then download the model again or save it again") from None
    except (OSError, ValueError, ImportError) as e:
        raise InputError(f"{flag} {name}: {not_found_hint(name)} ({first_line(e)})") from None


def not_found_hint(name):
    """What to do about a model that did not load, fitting what the user already set."""
    if is_sharded(name):
        return ("a checkpoint saved under --fsdp holds its weights in shards, which only "
                "--resume reads (with --fsdp); the run's best model, whole, is in its "
                "--downstream_model_dir")
    if Path(name).is_dir():
        return "the directory needs config.json, model weights and tokenizer.json"
    if constants.HF_HUB_OFFLINE:
        return ("it is not a local directory, and HF_HUB_OFFLINE is set, so only the Hugging "
                "Face cache was searched: pass a local directory, or unset HF_HUB_OFFLINE to "
                "download it")
    return ("it is not a local directory and could not be downloaded: check the name and "
            "the network, or pass a local directory (offline: HF_HUB_OFFLINE=1)")


class OneLinePerRetry(logging.Filter):
    """huggingface_hub logs each failed try of a download twice, the second time as the
    line "Retrying in 2s [Retry 2/5]"; the first, the whole urllib3 error, is dropped."""

    def filter(self, record):
        return "thrown while requesting" not in record.getMessage()


logging.getLogger("huggingface_hub.utils._http").addFilter(OneLinePerRetry())


def damaged_weights(name):
    """The first safetensors file of `name` (a directory, or a hub model in the local cache)
    whose header does not cover the file, or None."""
    if Path(name).is_dir():
        files = sorted(Path(name).glob("*.safetensors"))
    else:
        cached = try_to_load_from_cache(name, "model.safetensors")
        files = [Path(cached)] if isinstance(cached, str) else []
    for path in files:
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError:
            return path
    return None


def cpu_state_dict(model):
    """The model's weights on the CPU, each tied tensor once (GPT-2's output layer shares
    the token embedding; `from_pretrained` ties it again)."""
    unique = {name for name, _ in model.named_parameters()}
    unique |= {name for name, _ in model.named_buffers()}
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()
            if name in unique}


def to_cpu(obj):
    """`obj` (an optimizer's state, say) with every tensor in it copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def cpu_copy(model):
    """The same model on the CPU, built from its weights alone, so that no random
    initialisation draws on the random generator that training uses."""
    with LOADING:
        return type(model).from_pretrained(None, config=model.config,
                                           state_dict=cpu_state_dict(model))


def save_pretrained(model, tokenizer, directory, state_dict):
    """Write config, safetensors weights and tokenizer in Hugging Face's layout."""
    model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(directory)
