"""/tokenize and /detokenize (vLLM's): what the engine would see for a prompt or a conversation, and back.

A client counts tokens against max_model_len, or checks what the chat template renders, without generating."""
from __future__ import annotations

from .protocol import APIError, ChatCompletionRequest, DetokenizeRequest, TokenizeRequest
from .serving import _TRUNCATE_CHARS_PER_TOKEN as PER_TOKEN
from .serving import ServingContext
from .serving_chat import chat_prompt

# the tokenizer holds the GIL on the event loop (an 18 MB text took 27 s, every client waiting): one request sends at
# most PER_TOKEN characters, or ids, per token of max_model_len, as much as a prompt that truncates may (serving.py)


def tokenize(ctx: ServingContext, req: TokenizeRequest) -> dict:
    if req.model is not None:
        ctx.check_model(req.model)
    ctx.require_tokenizer()
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "Give either prompt (text) or messages (a conversation) to tokenize.", "prompt")
    if req.messages is not None:
        chat = ChatCompletionRequest(model=ctx.model_name, messages=req.messages, tools=req.tools,
                                     tool_choice=req.tool_choice, chat_template_kwargs=req.chat_template_kwargs,
                                     chat_template=req.chat_template, add_generation_prompt=req.add_generation_prompt,
                                     continue_final_message=req.continue_final_message, documents=req.documents)
        text = chat_prompt(ctx, chat)
    else:
        text = req.prompt
    if len(text) > PER_TOKEN * ctx.max_model_len:
        raise APIError(400, f"the text has {len(text)} characters, more than /tokenize reads ({PER_TOKEN} per token "
                            f"of max_model_len {ctx.max_model_len}): send it in parts.",
                       "messages" if req.messages is not None else "prompt")
    ids = ctx.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
    out = {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids}
    if req.return_token_strs:  # byte-level pieces ("Ġthe"), as vLLM's convert_ids_to_tokens: not the decoded text
        out["token_strs"] = [ctx.tokenizer.id_to_token(t) for t in ids]
    return out


def detokenize(ctx: ServingContext, req: DetokenizeRequest) -> dict:
    if req.model is not None:
        ctx.check_model(req.model)
    ctx.require_tokenizer()
    if len(req.tokens) > PER_TOKEN * ctx.max_model_len:
        raise APIError(400, f"{len(req.tokens)} token ids are more than /detokenize reads ({PER_TOKEN} per token of "
                            f"max_model_len {ctx.max_model_len}): send them in parts.", "tokens")
    # the model's vocabulary is padded past the tokenizer's: its padding ids (which it may sample) decode to nothing
    size = max(ctx.tokenizer.vocab_size, ctx.engine.core.vocab_size)
    bad = next((t for t in req.tokens if not 0 <= t < size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the model's vocabulary (0..{size - 1}).", "tokens")
    return {"prompt": ctx.tokenizer.decode(req.tokens, skip_special_tokens=False)}
