"""/tokenize and /detokenize (vLLM's): what the engine would see for a prompt or a conversation, and back.

A client counts tokens against max_model_len, or checks what the chat template renders, without generating."""
from __future__ import annotations

from .protocol import APIError, ChatCompletionRequest, DetokenizeRequest, TokenizeRequest
from .serving import ServingContext
from .serving_chat import chat_prompt


def tokenize(ctx: ServingContext, req: TokenizeRequest) -> dict:
    if req.model is not None:
        ctx.check_model(req.model)
    ctx.require_tokenizer()
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "Give either prompt (text) or messages (a conversation) to tokenize.", "prompt")
    if req.messages is not None:
        chat = ChatCompletionRequest(model=ctx.model_name, messages=req.messages, tools=req.tools,
                                     chat_template_kwargs=req.chat_template_kwargs,
                                     chat_template=req.chat_template, add_generation_prompt=req.add_generation_prompt)
        text = chat_prompt(ctx, chat)
    else:
        text = req.prompt
    ids = ctx.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
    return {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids}


def detokenize(ctx: ServingContext, req: DetokenizeRequest) -> dict:
    if req.model is not None:
        ctx.check_model(req.model)
    ctx.require_tokenizer()
    bad = next((t for t in req.tokens if not 0 <= t < ctx.tokenizer.vocab_size), None)
    if bad is not None:
        last = ctx.tokenizer.vocab_size - 1
        raise APIError(400, f"token id {bad} is outside the tokenizer's vocabulary (0..{last}).", "tokens")
    return {"prompt": ctx.tokenizer.decode(req.tokens, skip_special_tokens=False)}
