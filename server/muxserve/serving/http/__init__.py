"""KServe v2 over HTTP (FastAPI) and the simple /v1/classify API."""
