"""The HTTP doors: routes, uploads, guards, schemas, docs, the page, the uvicorn server."""
