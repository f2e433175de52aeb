"""HTTP routes of the transparent ledger (issue 5): the note key, signed checkpoints, RFC 9162 proofs, leaves.

    GET /v1/ledger/key                                   the checkpoint verifier key (C2SP vkey) and origin
    GET /v1/ledger/checkpoint                            the latest signed checkpoint (signed now if one is due)
    GET /v1/ledger/proof/inclusion?index=I&size=N        inclusion of tree leaf I in the tree of size N
    GET /v1/ledger/proof/inclusion?entry=E&size=N        the same for a receipt's ``index`` (report entry E)
    GET /v1/ledger/proof/consistency?from=M&to=N         the tree of size N extends the tree of size M
    GET /v1/ledger/entries?start=S&end=E                 leaves [S, E) (at most 1000), admin only

Hashes travel as lowercase hex. Proofs and checkpoints are public (they reveal hashes only); the leaves carry the
applicants' reports and need the admin bearer token.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from protocol.errors import TooLarge
from verifier.checkpoints import CheckpointSchedule, latest_checkpoint, note_signer, sign_checkpoint
from verifier.enroll import rebind_agent_key, rotate_agent_key
from verifier.errors import NotFound, RequestInvalid
from verifier.ledger import TreeReader, read_leaves, tree_index_of_entry, tree_size

log = logging.getLogger(__name__)

MAX_LEAVES_PER_PAGE = 1000
_Index = Annotated[int, Query(ge=0, le=2**62)]


def _check_size(engine: Engine, size: int) -> None:
    with engine.connect() as conn:
        current = tree_size(conn)
    if size > current:
        raise NotFound(f"size: expected at most the current tree size {current}, got {size}")


def ledger_router(engine: Engine, *, clock: Callable[[], datetime], write_lock: asyncio.Lock,
                  schedule: CheckpointSchedule, admin: list[Any]) -> APIRouter:
    router = APIRouter(prefix="/v1/ledger", tags=["ledger"])

    @router.get("/key")
    async def key() -> dict[str, str]:
        def read() -> dict[str, str]:
            with engine.connect() as conn:
                verifier = note_signer(conn).verifier()
            return {"origin": verifier.name, "verifier_key": verifier.encode()}

        return await run_in_threadpool(read)

    @router.get("/checkpoint")
    async def checkpoint() -> dict[str, Any]:
        async with write_lock:
            await run_in_threadpool(lambda: schedule.maybe_sign(engine, now=clock()))

        def read() -> dict[str, Any]:
            with engine.connect() as conn:
                latest = latest_checkpoint(conn)
            if latest is None:
                raise NotFound("checkpoint: expected one signed, got none yet")
            return latest.to_json()

        return await run_in_threadpool(read)

    @router.get("/proof/inclusion")
    async def inclusion(size: _Index, index: _Index | None = None, entry: _Index | None = None) -> dict[str, Any]:
        def prove() -> dict[str, Any]:
            if (index is None) == (entry is None):
                raise RequestInvalid("query: expected exactly one of 'index' (tree index) or 'entry' "
                                     "(a receipt's index)")
            _check_size(engine, size)
            with engine.connect() as conn:
                tree_index = index if index is not None else tree_index_of_entry(conn, entry or 0)
                if tree_index is None:
                    raise NotFound(f"entry: expected a report entry in the ledger, got {entry}")
                if tree_index >= size:
                    raise NotFound(f"index: expected below size {size}, got {tree_index}")
                reader = TreeReader(conn)
                proof = reader.inclusion(tree_index, size)
                return {"index": tree_index, "size": size, "leaf_hash": reader.leaf(tree_index).hex(),
                        "root": reader.root(size).hex(), "proof": [p.hex() for p in proof]}

        return await run_in_threadpool(prove)

    @router.get("/proof/consistency")
    async def consistency(size1: Annotated[int, Query(alias="from", ge=1, le=2**62)],
                          size2: Annotated[int, Query(alias="to", ge=1, le=2**62)]) -> dict[str, Any]:
        def prove() -> dict[str, Any]:
            if size1 > size2:
                raise RequestInvalid(f"from: expected at most to={size2}, got {size1}")
            _check_size(engine, size2)
            with engine.connect() as conn:
                reader = TreeReader(conn)
                return {"from": size1, "to": size2, "root1": reader.root(size1).hex(),
                        "root2": reader.root(size2).hex(),
                        "proof": [p.hex() for p in reader.consistency(size1, size2)]}

        return await run_in_threadpool(prove)

    @router.get("/entries", dependencies=admin)
    async def leaves(start: _Index, end: _Index) -> dict[str, Any]:
        if not start < end <= start + MAX_LEAVES_PER_PAGE:
            raise RequestInvalid(f"range: expected start < end <= start + {MAX_LEAVES_PER_PAGE}, got [{start}, {end})")

        def read() -> dict[str, Any]:
            with engine.connect() as conn:
                rows = read_leaves(conn, start, end)
            return {"entries": [{"index": r.tree_index, "kind": r.kind, "entry_index": r.entry_index,
                                 "data": base64.b64encode(r.data).decode("ascii"), "leaf_hash": r.leaf_hash.hex()}
                                for r in rows]}

        return await run_in_threadpool(read)

    return router


class RebindRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    public_key: Annotated[str, Field(min_length=1, max_length=100, description="base64 of the raw 32-byte key")]
    reason: Annotated[str, Field(min_length=1, max_length=500)]


def agent_key_router(engine: Engine, *, clock: Callable[[], datetime], write_lock: asyncio.Lock,
                     admin: list[Any]) -> APIRouter:
    """POST /v1/agents/{id}/rotate (a DSSE envelope of a key-rotation payload signed by the agent's current key)
    and POST /v1/admin/agents/{id}/rebind (admin only; logged as a key event)."""
    router = APIRouter(tags=["agents"])

    @router.post("/v1/agents/{agent_id}/rotate", openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "description": "A DSSE envelope (payloadType "
            "application/vnd.tianping.key-rotation.v1+json) signed by the agent's current key",
            "required": ["payload", "payloadType", "signatures"]}}}}})
    async def rotate(agent_id: str, request: Request) -> dict[str, Any]:
        body = await request.body()
        if len(body) > 4096:
            raise TooLarge(f"rotation request: expected at most 4096 bytes, got {len(body)}")
        async with write_lock:
            rotation = await run_in_threadpool(
                lambda: rotate_agent_key(engine, agent_id=agent_id, envelope=body, now=clock()))
        return rotation.to_json()

    @router.post("/v1/admin/agents/{agent_id}/rebind", dependencies=admin)
    async def rebind(agent_id: str, req: RebindRequest) -> dict[str, Any]:
        async with write_lock:
            rotation = await run_in_threadpool(
                lambda: rebind_agent_key(engine, agent_id=agent_id, public_key_b64=req.public_key, now=clock(),
                                         admin="admin-token", reason=req.reason))
        return rotation.to_json()

    return router


def sign_now(engine: Engine, now: datetime) -> dict[str, Any]:
    """``tianping-verifier checkpoint``: sign a checkpoint of the current tree (refusing an inconsistent one)."""
    return sign_checkpoint(engine, now=now).to_json()
