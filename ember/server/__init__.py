"""Ember's HTTP server: an OpenAI-compatible API over one compiled engine folder.

``ember serve artifacts/NAME`` (see ``ember.server.cli``) or, in Python,
``ember.server.app.create_app(lambda: ember.load(folder), model_name=...)`` served by any
ASGI server. See docs/serving.md.
"""
