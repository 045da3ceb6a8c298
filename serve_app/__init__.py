"""The Ray Serve application: one deployment per model behind one HTTP gateway.

Follow a request: ingress.py (routes, model lookup) -> directory.py (model table) -> deployment.py (tokenize,
token-budget batching, forward on the engine thread) -> models/ (the engines) -> back to ingress.py.
Configuration: config.py; application builders: app.py; errors: errors.py; wire schemas: protocol.py.
"""
