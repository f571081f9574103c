"""The pool dashboard: a static page (no build step) polling a JSON feed of the ingress."""
