"""The HTTP side: protocol adapters that turn requests into calls on the service side and its
typed results back into responses (REST routes, the v2 Open Inference Protocol, uploads,
content negotiation, middleware, API keys, request ids).

The boundary: nothing here imports torch (or torchvision). Images and latents cross it as the
service's opaque `Images` / numpy arrays; the service side (`app.service`) validates, batches
and runs the model, and never imports FastAPI or Starlette. `tests/app/test_boundary.py`
holds both rules.
"""
