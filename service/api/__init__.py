"""The HTTP API: FastAPI app factory, routers, wire schemas."""
