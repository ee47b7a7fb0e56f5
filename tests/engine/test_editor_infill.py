"""An editor's completions as the user types: an infill request at each keystroke, the file
before the cursor as the prefix and after it as the suffix (llama.vscode, Continue, Tabby).

The prompts are spelled out by hand from codellama-formats.md with the plain `tokenizers`
object, the kept rows counted from them, and the tokens compared with torch's greedy
tokens and with a fresh engine's: the prompt cache must not change what is completed."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

import torch_reference
from edge_runtime.engine import Engine
from edge_runtime.types import GenerationRequest, SamplingParams

from test_prompt_formats import TOKENIZER_JSON

GREEDY = SamplingParams(temperature=0.0)
FILE = "".join(f"def scale_{i}(values):\n    return [v * {i} for v in values]\n\n" for i in range(6))
CURSOR = FILE.index("def scale_3")
TYPED = "def total(v"


@pytest.fixture(scope="module")
def raw() -> Tokenizer:
    t = Tokenizer.from_file(str(TOKENIZER_JSON))
    t.encode_special_tokens = True
    return t


def by_hand(raw: Tokenizer, prefix: str, suffix: str, suffix_first: bool) -> list[int]:
    """codellama-formats.md, "Infilling": PSM, or SPM with `suffix_first`."""
    bos, pre, suf, mid = (raw.token_to_id(p) for p in ("<s>", "▁<PRE>", "▁<SUF>", "▁<MID>"))
    enc = raw.encode(prefix, add_special_tokens=False).ids
    sentinel = raw.encode("☺" + suffix, add_special_tokens=False).ids
    assert sentinel[:2] == [raw.token_to_id("▁"), raw.token_to_id("☺")]
    enc_infill = sentinel[2:]
    if suffix_first:
        return [bos, pre, suf, *enc_infill, mid, *enc]
    return [bos, pre, *enc, suf, *enc_infill, mid]


def common_start(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b) - 1) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("suffix_first", [False, True], ids=["psm", "spm"])
def test_typing_at_the_cursor_reuses_the_last_prompt_and_completes_as_torch_and_a_fresh_engine(
        tiny_bundle, tiny_checkpoint, raw, suffix_first):
    engine = Engine.from_bundle(tiny_bundle, prompt_lookup=False)
    fresh = Engine.from_bundle(tiny_bundle, prompt_lookup=False, prompt_cache="off")
    eot, eos = raw.token_to_id("▁<EOT>"), raw.token_to_id("</s>")
    held: list[int] = []  # the ids whose keys and values the last request left in the cache
    kept = []
    for k in range(1, len(TYPED) + 1):
        prefix, suffix = FILE[:CURSOR] + TYPED[:k], FILE[CURSOR:]
        request = GenerationRequest(mode="infill", prefix=prefix, suffix=suffix, suffix_first=suffix_first,
                                    max_tokens=6, sampling=GREEDY)
        result = engine.complete(request)
        ids = by_hand(raw, prefix, suffix, suffix_first)
        assert list(result.prompt_token_ids) == ids
        assert result.usage.cached_prompt_tokens == (common_start(held, ids) if held else 0)
        assert list(result.token_ids) == torch_reference.greedy(tiny_checkpoint, ids, 6, frozenset({eot, eos}))
        assert result.token_ids == fresh.complete(request).token_ids
        fed = list(result.token_ids) if result.finish_reason == "stop" else list(result.token_ids[:-1])
        held = ids + fed
        kept.append((len(ids), result.usage.cached_prompt_tokens))
    suffix_ids = len(by_hand(raw, "", FILE[CURSOR:], False)) - 4  # enc_infill(suffix): all but bos, PRE, SUF, MID
    for n, cached in kept[1:]:
        if suffix_first:  # a keystroke at the cursor changes the prompt's end only: all but its last ids kept
            assert n - cached <= 3
        else:  # the suffix comes after the prefix's end, and runs again at every keystroke
            assert n - cached > suffix_ids
