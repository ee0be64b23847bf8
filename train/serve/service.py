"""`rectrain serve EXPORT_DIR`: real-time recommendations over HTTP (FastAPI on uvicorn).

    POST /recommend  {"history": [ids], "history_text": [texts], "k": 10, "exclude": [ids]}
                     -> {"items": [{"item_id", "score", "because": [{"item_id", "similarity"}]}]}
    POST /embed      {"texts": [item texts]} or {"history": [ids], "history_text": [...]} -> {"embeddings"}
    POST /items      {"items": [{"item_id": ..., <text fields>}]}: embedded and searchable at once
    GET  /health     items, embedding size, index kind
    GET  /docs       the OpenAPI page (/openapi.json the schema)

Concurrent /recommend requests are batched: the first request of a batch waits at most
`batch_wait_ms` for others (up to `max_batch`), and the batch's users go through the encoder
in one forward pass, which is where a request's time goes. Bad input is a 4xx with a one-line
reason: 422 for a malformed body or a value out of range, 404 for an unknown item id, 409 for
an item id that is already there."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from train.errors import UserError
from train.serve.recommender import Query, Recommender, UnknownItems

log = logging.getLogger(__name__)

MAX_HISTORY = 1000  # ids or texts in one request: longer histories are cut by the model anyway
MAX_K = 1000
ItemId = str | int


class RecommendRequest(BaseModel):
    history: list[ItemId] = Field(default=[], max_length=MAX_HISTORY, description="catalog item ids, oldest first")
    history_text: list[str] = Field(default=[], max_length=MAX_HISTORY,
                                    description="texts of items outside the catalog, after the ids")
    k: int = Field(default=10, ge=1, le=MAX_K, description="how many items to return")
    exclude: list[ItemId] = Field(default=[], max_length=10 * MAX_HISTORY, description="item ids never to return")

    def query(self) -> Query:
        return Query([str(i) for i in self.history], list(self.history_text), [str(i) for i in self.exclude], self.k)


class Reason(BaseModel):
    item_id: str
    similarity: float


class Recommendation(BaseModel):
    item_id: str
    score: float
    because: list[Reason]


class RecommendResponse(BaseModel):
    items: list[Recommendation]


class EmbedRequest(BaseModel):
    texts: list[str] = Field(default=[], max_length=MAX_HISTORY, description="item texts to embed")
    history: list[ItemId] = Field(default=[], max_length=MAX_HISTORY, description="a user to embed: item ids")
    history_text: list[str] = Field(default=[], max_length=MAX_HISTORY, description="... and outside item texts")


class NewItems(BaseModel):
    items: list[dict[str, Any]] = Field(min_length=1, max_length=10_000,
                                        description='each {"item_id": ..., and its text fields, e.g. "title"}')


class Batcher:
    """Gathers concurrent queries into one `recommend` call on a worker thread."""

    def __init__(self, recommender: Recommender, max_batch: int, wait_s: float) -> None:
        self.recommender, self.max_batch, self.wait_s = recommender, max_batch, wait_s
        self.queue: asyncio.Queue[tuple[Query, asyncio.Future[list[dict[str, Any]]]]] | None = None
        self.worker: asyncio.Task[None] | None = None

    async def submit(self, query: Query) -> list[dict[str, Any]]:
        if self.queue is None:  # made on the serving loop, the first time it is used
            self.queue = asyncio.Queue()
            self.worker = asyncio.create_task(self.run())
        future: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        await self.queue.put((query, future))
        return await future

    async def run(self) -> None:
        assert self.queue is not None
        while True:
            batch = [await self.queue.get()]
            deadline = asyncio.get_running_loop().time() + self.wait_s
            while len(batch) < self.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout) if timeout > 0
                                 else self.queue.get_nowait())
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
            await self.answer(batch)

    async def answer(self, batch: list[tuple[Query, asyncio.Future[list[dict[str, Any]]]]]) -> None:
        try:
            answers = await asyncio.to_thread(self.recommender.recommend, [query for query, _ in batch])
        except Exception as err:
            if len(batch) == 1:
                batch[0][1].set_exception(err)
                return
            # One bad query must not fail its neighbours: answer each alone.
            for item in batch:
                await self.answer([item])
            return
        for (_, future), answer in zip(batch, answers):
            if not future.done():
                future.set_result(answer)


def create_app(recommender: Recommender, batching: bool = True, max_batch: int = 32,
               batch_wait_ms: float = 2.0) -> FastAPI:
    app = FastAPI(title="rectrain", description=f"Recommendations from {recommender.manifest.get('run_dir', '?')} "
                  f"({recommender.manifest.get('checkpoint', '?')})", version="1")
    batcher = Batcher(recommender, max_batch, batch_wait_ms / 1000) if batching else None

    async def answer(query: Query) -> list[dict[str, Any]]:
        try:
            recommender.rows_of(query.history)  # a bad id is this request's 404, not its batch's
            recommender.rows_of(query.exclude, "exclude")
            if batcher is not None:
                return await batcher.submit(query)
            return (await asyncio.to_thread(recommender.recommend, [query]))[0]
        except UnknownItems as err:
            raise HTTPException(404, str(err)) from None
        except UserError as err:
            raise HTTPException(422, str(err)) from None

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "items": len(recommender), "dim": recommender.dim, "index": recommender.index.kind,
                "user_encoder": recommender.config.model.user_encoder}

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(request: RecommendRequest) -> dict[str, Any]:
        return {"items": await answer(request.query())}

    @app.post("/embed")
    async def embed(request: EmbedRequest) -> dict[str, Any]:
        if bool(request.texts) == bool(request.history or request.history_text):
            raise HTTPException(422, "give either texts (items) or history / history_text (a user)")
        if request.texts:
            vectors = await asyncio.to_thread(recommender.embed_texts, list(request.texts))
            return {"embeddings": vectors.tolist()}
        try:
            rows = recommender.rows_of([str(i) for i in request.history])
        except UnknownItems as err:
            raise HTTPException(404, str(err)) from None
        users, _ = await asyncio.to_thread(recommender.embed_users, [rows], [list(request.history_text)])
        return {"embeddings": users.tolist()}

    @app.post("/items")
    async def add_items(request: NewItems) -> dict[str, Any]:
        missing = [n for n, item in enumerate(request.items) if item.get("item_id") in (None, "")]
        if missing:
            raise HTTPException(422, f"items[{missing[0]}]: no item_id")
        try:
            added = await asyncio.to_thread(recommender.add_items, list(request.items))
        except UserError as err:
            raise HTTPException(409, str(err)) from None
        return {"added": added, "items": len(recommender)}

    return app


def serve(recommender: Recommender, host: str, port: int, batching: bool = True, max_batch: int = 32,
          batch_wait_ms: float = 2.0) -> None:
    import uvicorn

    app = create_app(recommender, batching, max_batch, batch_wait_ms)
    print(f"serving {len(recommender)} items on http://{host}:{port} (API page: http://{host}:{port}/docs)",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
