"""An OpenAI-compatible HTTP API in front of the Triton pipeline (README "OpenAI API").

``app`` (the endpoints), ``protocol`` (request bodies and their checks),
``pipeline`` (trillm_client.AsyncClient calls), ``render`` (response bodies and
SSE chunks), ``server`` (uvicorn, draining on SIGTERM), ``process`` (the child
process ``trillm serve`` runs).
"""
