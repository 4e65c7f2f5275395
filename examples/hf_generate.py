"""Generate with a Hugging Face transformers model whose attention is attnext's.

One call registers attnext with transformers; then ``attn_implementation="attnext"``
works wherever "sdpa" does. The model here is a randomly initialised tiny Llama with
grouped-query heads (no download); with a real checkpoint it is the same two lines:

    import attnext.integrations.transformers as attnext_hf
    attnext_hf.register()
    model = AutoModelForCausalLM.from_pretrained("...", attn_implementation="attnext")

    python examples/hf_generate.py            # a small model
    python examples/hf_generate.py --tiny     # seconds: what CI runs

Needs transformers: pip install 'attnext[hf]'.
"""
import argparse
import copy
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import attnext.integrations.transformers as attnext_hf


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a model small enough for CI (seconds)")
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if args.tiny else dict(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=8)
    new_tokens = 16 if args.tiny else args.new_tokens

    attnext_hf.register()  # attn_implementation="attnext" from here on
    config = LlamaConfig(vocab_size=1000, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, **size)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="attnext").eval()
    # from_config records the implementation in the config it is given: one copy each
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    reference.load_state_dict(model.state_dict())

    # a left-padded batch of two prompts of 128 tokens, as a tokenizer with
    # padding_side="left" gives it. The prefill runs attnext's kernel; each decode step
    # (one token per sequence) is small enough that attnext hands it to transformers'
    # sdpa, whose per-call cost is lower (ATTNEXT_SDPA_SMALL_WORK; explain says so)
    prompt = 128
    ids = torch.randint(3, 1000, (2, prompt))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    for m in (model, reference):  # first calls: lazy initialisation, attnext's kernel choice
        m.generate(ids, **dict(kw, max_new_tokens=2))
    for name, m in (("attnext", model), ("sdpa", reference)):
        t0 = time.perf_counter()
        out = m.generate(ids, **kw)
        print(f"{name:8s} {new_tokens * ids.shape[0] / (time.perf_counter() - t0):8.1f} tokens/s  "
              f"{out[1, prompt:].tolist()}")
        if name == "attnext":
            ours = out
    assert torch.equal(ours, out), "attnext and sdpa generated different tokens"
    assert attnext_hf.stats["attnext"] > 0, "attnext's attention never ran"
    print("identical tokens; attention calls (attnext's kernel, handed to sdpa):", attnext_hf.stats)


if __name__ == "__main__":
    main()
