"""The OpenAI-compatible wire format (LangChain, LlamaIndex, the ``openai`` client) as an
adapter over the gateway: OpenAI's request in, the gateway's text embedding, OpenAI's answer out."""

from __future__ import annotations

import base64

from ingrain_bento import schemas as s
from ingrain_bento.front.gateway import ModelGateway

__all__ = ["openai_embeddings", "openai_models"]


async def openai_embeddings(gateway: ModelGateway, request: s.OpenAIEmbeddingRequest) -> s.OpenAIEmbeddingResponse:
    import numpy as np

    texts = s.as_list(request.input)
    inner = s.build(s.InferenceRequest, name=request.model, text=texts, n_dims=request.dimensions,
                    prompt_name=request.prompt_name, prompt=request.prompt, truncate=request.truncate,
                    truncation_direction=request.truncation_direction)
    rows = (await gateway.embed_text(inner)).embeddings
    data = [
        s.OpenAIEmbedding(index=i, embedding=base64.b64encode(np.asarray(row, dtype=np.float32).tobytes()).decode()
                          if request.encoding_format == "base64" else row)
        for i, row in enumerate(rows)
    ]
    tokens = sum(len(text.split()) for text in texts)  # whitespace words: OpenAI clients only display usage
    return s.OpenAIEmbeddingResponse(data=data, model=request.model,
                                     usage=s.OpenAIUsage(prompt_tokens=tokens, total_tokens=tokens))


async def openai_models(gateway: ModelGateway) -> s.OpenAIModelList:
    return s.OpenAIModelList(data=[s.OpenAIModel(id=model.model_id, owned_by=model.library)
                                   for model in await gateway.served_models()])
