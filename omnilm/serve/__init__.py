"""Serving: a continuous-batching engine (`engine`) and, with the serve extra
(`pip install omnilm[serve]`), an OpenAI-compatible HTTP server over it (`api`, `omnilm serve`).

Nothing is imported here, so that `omnilm.serve.engine` loads without the extra.
"""
