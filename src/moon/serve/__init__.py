"""`moon serve`: the HTTP service over a run directory (embed, search, lookup, versions, reload).

    server.py    the command: who may reach it, the process, uvicorn
    app.py       routes, request and response models, errors, the version header, metrics per request
    service.py   the serving model, the current state, reloads, real-time items
    state.py     one store version ready to answer: stored vectors, base + delta indexes, categories
    batching.py  micro-batching of embedding requests
    limits.py    what one request may ask for; base64 images checked and decoded
    realtime.py  items added while serving: checked, embedded, kept
    engines.py   searches sent to Milvus instead of the version's own indexes
    metrics.py   Prometheus metrics
"""
