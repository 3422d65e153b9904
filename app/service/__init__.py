"""The service side: the models and everything that touches torch. `registry` loads
checkpoints; `predict.ModelHandle` is the typed core every protocol adapter calls (requests in,
`Generated` / `Scored` / `Neighbours` out, metrics observed once); `batching` coalesces calls
into batches on a worker thread; `inference` is the one module that runs the model; `imaging`
decodes uploads to tensors and encodes tensors to PNG and GIF; `faults` holds the test hooks.

It never imports FastAPI or Starlette (`tests/app/test_boundary.py`): a new protocol (gRPC,
Ray Serve's handles) plugs into `ModelHandle` without HTTP.
"""
