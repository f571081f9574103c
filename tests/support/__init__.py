"""What the tests and the benchmarks share: the local Ray cluster they run on, the SSE reader, a
closed loop of streaming clients, and bare vLLM's server as our engine runs it. Benchmarks import
from here; tests never import `benchmarks/` (an import-linter contract in pyproject.toml)."""
