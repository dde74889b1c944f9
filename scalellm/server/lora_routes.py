"""LoRA adapters over HTTP: a request's `model` naming an adapter, the adapters in /v1/models, and
vLLM's runtime routes POST /v1/load_lora_adapter {lora_name, lora_path} and POST
/v1/unload_lora_adapter {lora_name} (behind the API key, as every route but the public ones).

Unloading refuses new requests for the adapter at once; requests already running with it finish,
and the adapter's weights go after the last of them.
"""
from __future__ import annotations

import itertools

import msgspec
from aiohttp import web

from scalellm.lora_request import LoRARequest
from scalellm.server import protocol as P
from scalellm.server.errors import APIError
from scalellm.server.errors import decode_body


_load_decoder = msgspec.json.Decoder(P.LoadLoRARequest)
_unload_decoder = msgspec.json.Decoder(P.UnloadLoRARequest)


class LoRARoutes:
    def __init__(self, server):
        self.server = server
        self._ids = itertools.count(1)

    def manager(self):
        return self.server.engine.engine.loras

    def adapter_for(self, model: str | None) -> str | None:
        """The adapter a request's `model` names, None for the base model; 404 for neither."""
        loras = self.manager() if self.server.engine is not None else None
        if model is not None and loras is not None and loras.serves(model):
            return model
        self.server.check_model(model)
        return None

    def cards(self) -> list[P.ModelCard]:
        loras = self.manager()
        if loras is None:
            return []
        srv = self.server
        cards = []
        for name in loras.names():
            request = loras.requests.get(name)  # (gone if the engine thread dropped it meanwhile)
            if request is not None:
                cards.append(P.ModelCard(name, srv.created, srv.engine.engine.max_model_len, root=request.lora_path,
                                         parent=srv.model_name))
        return cards

    async def _body(self, request: web.Request, decoder):
        """The route's body, once the server serves and has LoRA on (a 503 or 400 before reading it)."""
        self.server.check_ready()
        if self.manager() is None:
            raise APIError(400, "LoRA is not enabled on this server (start it with --enable-lora)")
        return decode_body(decoder, await request.read())

    async def load(self, request: web.Request) -> web.Response:
        srv = self.server
        req = await self._body(request, _load_decoder)
        if req.lora_name in srv.model_aliases:
            raise APIError(400, f"{req.lora_name!r} is the base model's name", param="lora_name")
        if self.manager().serves(req.lora_name):
            raise APIError(400, f"the LoRA adapter {req.lora_name!r} has already been loaded", param="lora_name")
        try:
            await srv.engine.call(srv.engine.engine.add_lora, LoRARequest(req.lora_name, next(self._ids), req.lora_path))
        except ValueError as e:
            raise APIError(400, str(e), param="lora_path") from None
        return web.Response(text=f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        srv = self.server
        req = await self._body(request, _unload_decoder)
        try:
            await srv.engine.call(srv.engine.engine.remove_lora, req.lora_name)
        except KeyError:
            raise APIError(404, f"the LoRA adapter {req.lora_name!r} is not loaded", param="lora_name",
                           code="model_not_found") from None
        return web.Response(text=f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
