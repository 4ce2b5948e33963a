"""The HTTP ceiling: a bare FastAPI JSON endpoint, served like the service (see run.py)."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
