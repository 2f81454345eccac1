"""Reading request bodies with a size limit enforced before they are held in memory."""

from fastapi import Request
from starlette.exceptions import HTTPException


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"payload of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"payload exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
