"""The offline API: LLM(model=...).generate(prompts, SamplingParams(...))."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as Seq

from tqdm import tqdm

from scalellm.config import EngineConfig
from scalellm.engine.engine import LLMEngine, Request
from scalellm.lora_request import LoRARequest
from scalellm.outputs import CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from scalellm.pooling_params import PoolingParams
from scalellm.sampling_params import SamplingParams
from scalellm.server.chat_templates import template_for

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "cpu", **engine_kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False, lora_request: LoRARequest | Seq[LoRARequest | None] | None = None
                 ) -> list[RequestOutput]:
        """lora_request: the LoRA adapter every prompt runs with, or one (or None) per prompt; needs
        LLM(..., enable_lora=True); an adapter not seen before is loaded first."""
        return [_to_output(r) for r in self._requests(prompts, sampling_params, use_tqdm, lora_request)]

    def _requests(self, prompts, sampling_params, use_tqdm: bool, lora_request=None) -> list[Request]:
        """Run the prompts to the end; their engine requests."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or of token id lists")
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("sampling_params must be one SamplingParams or one per prompt")
        if lora_request is not None:
            loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
            if len(loras) != len(prompts):
                raise ValueError("lora_request must be one LoRARequest or one per prompt")
            for lora in {x for x in loras if x is not None}:
                self.engine.add_lora(lora)
            params_list = [p if lora is None else dataclasses.replace(p, lora_name=lora.lora_name)
                           for p, lora in zip(params_list, loras)]
        requests: list[Request] = []
        try:
            for prompt, p in zip(prompts, params_list):
                requests.append(self.engine.add_request(f"offline-{next(self._ids)}", prompt, p))
        except ValueError:
            for r in requests:
                self.engine.abort_request(r.request_id)
            raise
        self._run(requests, use_tqdm)
        return requests

    def embed(self, prompts: Prompt | Seq[Prompt], pooling_params: PoolingParams | None = None,
              use_tqdm: bool = False) -> list[EmbeddingRequestOutput]:
        """Each prompt's embedding: its final hidden states pooled as the model is configured (a
        sentence-transformers layout or pooler_config=...; else the last token, normalized) or as
        pooling_params asks."""
        params = SamplingParams(max_tokens=0, temperature=0.0, pooling=pooling_params or PoolingParams())
        return [EmbeddingRequestOutput(r.request_id, r.prompt_token_ids, EmbeddingOutput(r.seqs[0].embedding.tolist()))
                for r in self._requests(prompts, params, use_tqdm)]

    def chat(self, messages, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False, tools: list[dict] | None = None,
             chat_template: str | None = None) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of them. tools: OpenAI
        function definitions handed to the chat template (a model whose template knows no tools gets the
        bundled ChatML template with tools); force a call's shape with SamplingParams(structured_outputs=...)."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt, tools, chat_template) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, chat_template: str | None = None) -> list[int]:
        if not conversation:
            raise ValueError("messages must not be empty")
        for m in conversation:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"messages: each message needs a role of system, user or assistant; got {m!r}")
        chat_template = chat_template or template_for(self.tokenizer, conversation, tools)
        ids = self.tokenizer.apply_chat_template(conversation, tools=tools, chat_template=chat_template,
                                                 add_generation_prompt=add_generation_prompt, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def _run(self, requests: list[Request], use_tqdm: bool) -> None:
        pending = {r.request_id for r in requests}
        bar = tqdm(total=len(requests), desc="generating", disable=not use_tqdm)
        while pending:
            for delta in self.engine.step():
                if delta.request_id in pending and delta.request_id not in self.engine.requests:
                    pending.discard(delta.request_id)
                    bar.update(1)
            for request_id, stage, error in self.engine.take_failures():
                if request_id in pending:  # the whole call fails, as any exception in it would
                    for other in pending:
                        self.engine.abort_request(other)
                    raise RuntimeError(f"request {request_id} failed in {stage}: {error}") from error
        bar.close()


def _to_output(request: Request) -> RequestOutput:
    outputs = [CompletionOutput(s.index, s.text, s.output_token_ids, s.finish_reason, s.stop_reason, s.logprobs)
               for s in sorted(request.seqs, key=lambda s: s.index)]
    return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs, True,
                         request.seqs[0].num_cached_tokens, request.seqs[0].prompt_logprobs)
