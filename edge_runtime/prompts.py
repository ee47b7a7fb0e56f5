"""Prompt token ids for Code Llama's three modes, built from ids.

Control tokens (bos, eos, the infilling tokens, `<step>`) are always inserted as
ids and user text is always encoded as text, so a request can never smuggle a
control token in by writing its text (see `CodeLlamaTokenizer.encode`). The
formats follow Meta's reference (`llama/generation.py`) and, for Code Llama 70B
Instruct, its published chat template; `/work/shared/codellama-formats.md`
lists them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import BadRequest, UnsafePrompt, UnsupportedMode
from .tokenizer import CodeLlamaTokenizer
from .types import GenerationRequest, Message

ChatFormat = Literal["llama2", "source-step"]
CHAT_FORMATS: tuple[str, ...] = ("llama2", "source-step")

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# Meta's prompt-injection guard: a message containing any of these is refused.
SPECIAL_TAGS: tuple[str, ...] = (B_INST, E_INST, "<<SYS>>", "<</SYS>>", "<step>")
UNSAFE_MESSAGE = "Error: special tags are not allowed as part of the prompt."

ROLES: tuple[str, ...] = ("system", "user", "assistant")
SOURCE_STEP_REPLY_HEADER = "Source: assistant\nDestination: user\n\n "


@dataclass(frozen=True)
class PromptPlan:
    """What the generator needs to run one request's prompt."""

    ids: list[int]  # prompt token ids, bos included
    stop_ids: frozenset[int]  # generation ends when one of these is sampled (not emitted)
    strip_leading_space: bool  # detokenizer: drop one leading space of the output (chat; an empty completion prompt)
    warnings: tuple[str, ...] = ()  # for the reply (e.g. chat on a model not tuned for it); the ids stand
    max_new_tokens: int = 0  # the most tokens to generate: the request's max_tokens, or the context's rest (engine.plan)


# --------------------------------------------------------------------- entry point
def build_prompt(
    request: GenerationRequest, tokenizer: CodeLlamaTokenizer, chat_format: ChatFormat | str = "llama2",
    stop_ids: frozenset[int] = frozenset(),
) -> PromptPlan:
    """The prompt ids, stop ids and decoding rule for `request`.

    `chat_format` is a property of the checkpoint (recorded in the bundle), never
    chosen by the request; so are `stop_ids`, ids every mode also stops at (the bundle's
    `tokenizer.stop_ids`: a fine-tune's own end token). Raises BadRequest (missing/invalid
    field, bad roles), UnsafePrompt (special tags in chat messages) or UnsupportedMode (infill
    on a tokenizer without infilling tokens, source-step chat without `<step>`).
    """
    plan = _mode_prompt(request, tokenizer, chat_format)
    return plan if stop_ids <= plan.stop_ids else dataclasses.replace(plan, stop_ids=plan.stop_ids | stop_ids)


def _mode_prompt(request: GenerationRequest, tokenizer: CodeLlamaTokenizer,
                 chat_format: ChatFormat | str) -> PromptPlan:
    if request.mode == "complete":
        return completion_prompt(tokenizer, _require_str(request.prompt, "prompt"))
    if request.mode == "infill":
        prefix = _require_str(request.prefix, "prefix")
        suffix = "" if request.suffix is None else _require_str(request.suffix, "suffix")  # as over MQTT
        return infill_prompt(tokenizer, prefix, suffix, suffix_first=request.suffix_first)
    if request.mode == "chat":
        if chat_format == "llama2":
            return llama2_chat_prompt(tokenizer, request.messages)
        if chat_format == "source-step":
            return source_step_chat_prompt(tokenizer, request.messages)
        raise ValueError(f"unknown chat format {chat_format!r}; expected one of {CHAT_FORMATS}")
    raise UnsupportedMode(f"mode must be one of 'complete', 'infill', 'chat', got {request.mode!r}")


def user_text_chars(request: GenerationRequest) -> int:
    """The characters of text a request's prompt encodes at least (the prompt; prefix and suffix;
    every message's content without the whitespace the chat formats strip), without the format's
    own text; fields that are not strings count 0 (build_prompt names them)."""
    if request.mode == "complete":
        texts: Sequence[object] = (request.prompt,)
    elif request.mode == "infill":
        texts = (request.prefix, request.suffix)
    elif request.mode == "chat" and isinstance(request.messages, Sequence):
        contents = (getattr(m, "content", None) for m in request.messages)
        texts = tuple(c.strip() if isinstance(c, str) else None for c in contents)
    else:
        texts = ()
    return sum(len(t) for t in texts if isinstance(t, str))


def _require_str(value: object, field: str) -> str:
    if value is None:
        raise BadRequest(f"{field} is required for this mode")
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------- completion
def completion_prompt(tokenizer: CodeLlamaTokenizer, prompt: str) -> PromptPlan:
    """`[bos] + encode(prompt)`; stop at eos.

    The output continues the prompt: `prompt + output` is the decode of prompt and output as one
    sequence (as Hugging Face's pipeline and llama.cpp return it), so a first token "▁x" after
    "x =" keeps its space. Decoding the output alone, as Meta's `text_completion` does, would drop
    it ("x =x"). SentencePiece's implicit leading space belongs to the prompt's first token, or,
    for an empty prompt, to the output's, which is then dropped."""
    text_ids = tokenizer.encode(prompt)
    return PromptPlan(ids=[tokenizer.bos_id, *text_ids], stop_ids=frozenset({tokenizer.eos_id}),
                      strip_leading_space=not text_ids)


# ------------------------------------------------------------------------ infilling
def infill_prompt(tokenizer: CodeLlamaTokenizer, prefix: str, suffix: str, *, suffix_first: bool = False) -> PromptPlan:
    """Fill-in-the-middle, prefix-suffix-middle or (suffix_first) suffix-prefix-middle.

    PSM: `[bos, PRE] + encode(prefix) + [SUF] + encode_infilling(suffix) + [MID]`
    SPM: `[bos, PRE, SUF] + encode_infilling(suffix) + [MID] + encode(prefix)`
    Stops at EOT (and eos). The output keeps the first token's leading space, as
    Meta's `decode_infilling` does, so that `prefix + output + suffix` is the file.
    """
    fim = tokenizer.infill_ids
    if fim is None or not tokenizer.supports_infill:
        raise UnsupportedMode(
            "infill needs the tokenizer's ▁<PRE>, ▁<SUF>, ▁<MID> and ▁<EOT> tokens, and this model's "
            "tokenizer lacks them (Code Llama 34B and the Python variants do not support infilling)"
        )
    bos = tokenizer.bos_id
    if suffix_first:
        ids = [bos, fim.prefix, fim.suffix, *tokenizer.encode_infilling(suffix), fim.middle, *tokenizer.encode(prefix)]
    else:
        ids = [bos, fim.prefix, *tokenizer.encode(prefix), fim.suffix, *tokenizer.encode_infilling(suffix), fim.middle]
    stops = frozenset({fim.eot, tokenizer.eos_id})
    return PromptPlan(ids=ids, stop_ids=stops, strip_leading_space=False)


# ----------------------------------------------------------------------------- chat
def check_dialog(messages: Sequence[Message]) -> None:
    """Roles: optional leading system, then user/assistant alternating, ending with user.

    Then Meta's guard: any message containing one of SPECIAL_TAGS is refused.
    """
    if not messages:
        raise BadRequest("messages is required for chat and must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Message) or not isinstance(m.role, str) or not isinstance(m.content, str):
            raise BadRequest(f"messages[{i}] must be a Message (or a {{'role', 'content'}} dict) with a string role "
                             f"and a string content, got {m!r:.80}")
        if m.role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {ROLES}, got {m.role!r}")
    start = 1 if messages[0].role == "system" else 0
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i].role != expected:
            raise BadRequest(
                f"messages[{i}].role must be {expected!r}: roles are an optional 'system', then "
                f"'user' and 'assistant' alternating, ending with 'user'"
            )
    if len(messages) == start or messages[-1].role != "user":
        raise BadRequest("messages must end with a 'user' message")
    for i, m in enumerate(messages):
        for tag in SPECIAL_TAGS:
            if tag in m.content:
                raise UnsafePrompt(f"messages[{i}] contains the special tag {tag!r}; {UNSAFE_MESSAGE}")


def llama2_chat_prompt(tokenizer: CodeLlamaTokenizer, messages: Sequence[Message]) -> PromptPlan:
    """Code Llama 7B/13B/34B Instruct (Llama 2 chat) format; stops at eos.

    Completed pair: `[bos] + encode(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ") + [eos]`;
    final turn: `[bos] + encode(f"{B_INST} {user.strip()} {E_INST}")`. `[INST]` is text, not a token.
    """
    check_dialog(messages)
    turns = _fold_system(messages)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    ids: list[int] = []
    for user, answer in zip(turns[0:-1:2], turns[1::2]):
        ids += [bos, *tokenizer.encode(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} "), eos]
    ids += [bos, *tokenizer.encode(f"{B_INST} {turns[-1].strip()} {E_INST}")]
    return PromptPlan(ids=ids, stop_ids=frozenset({eos}), strip_leading_space=True)


def _fold_system(messages: Sequence[Message]) -> list[str]:
    """Message contents with a leading system message folded into the first user one."""
    if messages[0].role != "system":
        return [m.content for m in messages]
    first_user = B_SYS + messages[0].content + E_SYS + messages[1].content
    return [first_user, *(m.content for m in messages[2:])]


def source_step_chat_prompt(tokenizer: CodeLlamaTokenizer, messages: Sequence[Message]) -> PromptPlan:
    """Code Llama 70B Instruct format; stops at `<step>` (and eos).

    Template text: `<s>` + per message `"Source: {role}\\n\\n {content.strip()} <step> "` +
    `"Source: assistant\\nDestination: user\\n\\n "`. Built from ids as
    `[bos] + Σ (encode(f"Source: {role}\\n\\n {content}") + [step]) + encode(reply header)`:

    Leading spaces: `encode` prepends SentencePiece's implicit '▁' to each segment,
    so every segment starts with "▁Source", which is the space that follows
    `<step>` in the template (the `<step>` token absorbs its surrounding spaces);
    the space that precedes `<step>` is not encoded (no stray "▁" before it). This
    reproduces the ids of Meta's `dialog_prompt_tokens` and of the published chat
    template, e.g. `[1, 7562, 29901, 1788, 13, 13, 2184, 9508, 32015, 7562, ...]`
    for "System prompt". An empty content yields `"Source: {role}"` + `<step>`, as
    in Meta's reference (the template's whitespace is absorbed by `<step>`). No
    system message is invented when none is given (the template adds none).
    """
    step = tokenizer.step_id
    if step is None:
        raise UnsupportedMode("chat format 'source-step' needs a '<step>' token, and this tokenizer has none")
    check_dialog(messages)
    ids = [tokenizer.bos_id]
    for m in messages:
        ids += [*tokenizer.encode(_source_step_message(m)), step]
    ids += tokenizer.encode(SOURCE_STEP_REPLY_HEADER)
    return PromptPlan(ids=ids, stop_ids=frozenset({step, tokenizer.eos_id}), strip_leading_space=True)


def _source_step_message(message: Message) -> str:
    content = message.content.strip()
    header = f"Source: {message.role}"
    return f"{header}\n\n {content}" if content else header
