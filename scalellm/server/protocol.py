"""OpenAI wire format as msgspec Structs: bodies decode straight from bytes, responses encode to bytes.

Unknown request fields are ignored (clients send extras); response fields left UNSET are omitted (msgspec never encodes UNSET).
"""
from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType


# -- requests ----------------------------------------------------------------------------------
class StreamOptions(Struct):
    include_usage: bool = False


class ResumedChoice(Struct, kw_only=True):
    index: int
    token_ids: list[int]  # what the choice generated before the cut (its text, as streamed, follows from them)
    finished: bool = False  # its last chunk was sent: not run again, its tokens count in usage


class Resume(Struct, kw_only=True):
    """A streamed generation cut mid-way (its server died), continued here: the stream goes on under
    its id, after what its client got. Choices not listed start from their first token."""
    id: str
    created: int
    choices: list[ResumedChoice] = []


class JsonSchemaFormat(Struct, kw_only=True):
    name: str | None = None
    description: str | None = None
    schema: Any = None
    strict: bool | None = None


class ResponseFormat(Struct, kw_only=True):
    type: str
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, grammar, json_object, structural_tag."""
    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: Any = None
    disable_any_whitespace: bool | None = None
    disable_fallback: bool | None = None  # one backend here: nothing to fall back to
    disable_additional_properties: bool | None = None
    whitespace_pattern: str | None = None  # refused when set
    backend: str | None = None  # accepted: llguidance serves every request


class SamplingFields(Struct, kw_only=True):
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* names
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    return_token_ids: bool = False  # vLLM's: each choice carries its token ids (streamed: each chunk's)
    resume: Resume | None = None  # continue a stream cut elsewhere (server/resume.py)
    # accepted, no effect on the output
    user: str | None = None
    metadata: Any = None
    store: bool | None = None
    service_tier: str | None = None
    priority: int | None = None
    # would change the output and are not implemented: refused with a 400 when given
    best_of: Any = UNSET
    use_beam_search: Any = UNSET
    length_penalty: Any = UNSET
    logits_processors: Any = UNSET
    # vLLM's: each prompt token's logprob and this many top ones; keep only the prompt's last k tokens
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: str | list[Any]  # str, [str], [int] or [[int]]: msgspec allows one array type per union
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: Any = UNSET


class TextPart(Struct):
    type: str
    text: str | None = None


class FunctionCall(Struct, kw_only=True):
    name: str
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(Struct, kw_only=True):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(Struct, kw_only=True):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None


class NamedFunction(Struct):
    name: str


class NamedToolChoice(Struct, kw_only=True):
    type: str = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    functions: Any = UNSET  # OpenAI's deprecated function calling: refused, use tools
    function_call: Any = UNSET
    chat_template: Any = UNSET
    continue_final_message: Any = UNSET
    documents: Any = UNSET
    prediction: Any = UNSET
    audio: Any = UNSET
    modalities: Any = UNSET


class TokenizeRequest(Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


# -- responses ---------------------------------------------------------------------------------
class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(Struct):
    """vLLM's prompt_logprobs entry: one token's logprob, its rank, and its text."""
    logprob: float
    rank: int | None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # per prompt position: token id (as a key) -> entry


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | UnsetType = UNSET  # with return_token_ids
    token_ids: list[int] | UnsetType = UNSET
    prompt_logprobs: PromptLogprobs | UnsetType = UNSET


class CompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: Usage | None | UnsetType = UNSET


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[TokenLogprob]


class ToolCallFunction(Struct):
    name: str
    arguments: str


class ToolCallOut(Struct):
    id: str
    function: ToolCallFunction
    type: str = "function"


class ChatResponseMessage(Struct):
    role: str
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | UnsetType = UNSET


class ChatChoice(Struct):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | UnsetType = UNSET  # with return_token_ids


class ChatCompletionResponse(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    object: str = "chat.completion"
    usage: Usage | None | UnsetType = UNSET
    prompt_token_ids: list[int] | UnsetType = UNSET  # with return_token_ids
    prompt_logprobs: PromptLogprobs | UnsetType = UNSET


class FunctionDelta(Struct):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class ToolCallDeltaOut(Struct):
    index: int
    function: FunctionDelta
    id: str | UnsetType = UNSET
    type: str | UnsetType = UNSET


class ChatDelta(Struct):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[ToolCallDeltaOut] | UnsetType = UNSET


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | UnsetType = UNSET  # with return_token_ids


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None | UnsetType = UNSET
    prompt_token_ids: list[int] | UnsetType = UNSET  # with return_token_ids: on the first chunk
    prompt_logprobs: PromptLogprobs | UnsetType = UNSET


class EmbeddingRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    input: str | list[Any]  # str, [str], [int] or [[int]], as a completion's prompt
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None
    normalize: bool | None = None  # vLLM's: None keeps the model's setting
    add_special_tokens: bool = True


class Embedding(Struct):
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format base64
    object: str = "embedding"


class EmbeddingUsage(Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(Struct):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: str = "list"
    id: str | UnsetType = UNSET
    created: int | UnsetType = UNSET


class LoadLoRARequest(Struct, kw_only=True, forbid_unknown_fields=True):
    lora_name: str
    lora_path: str


class UnloadLoRARequest(Struct, kw_only=True, forbid_unknown_fields=True):
    lora_name: str
    lora_int_id: int | None = None


class ModelCard(Struct):
    id: str
    created: int
    max_model_len: int
    object: str = "model"
    owned_by: str = "scalellm"
    root: str | UnsetType = UNSET  # a LoRA adapter's path
    parent: str | None = None  # a LoRA adapter's base model


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class ErrorBody(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(Struct):
    error: ErrorBody


completion_decoder = msgspec.json.Decoder(CompletionRequest)
chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
tokenize_decoder = msgspec.json.Decoder(TokenizeRequest)
detokenize_decoder = msgspec.json.Decoder(DetokenizeRequest)
embedding_decoder = msgspec.json.Decoder(EmbeddingRequest)
encoder = msgspec.json.Encoder()
