"""compare.py's report (benchmarks/report.py) without running a system: its unit test, beside it
(tests/ never import benchmarks/). Collected by `make test` and `make unit` (pytest's
testpaths)."""

from __future__ import annotations

from benchmarks import report


def test_main_table_ratios() -> None:
    """The ratio rows: ours / bare vLLM and ours / Ray Serve LLM from the mean over rounds."""

    def metrics(tok_s: float, ttft: float) -> dict[str, float]:
        return {
            "output_tok_s": tok_s,
            "ttft_p50_ms": ttft,
            "ttft_p99_ms": 2 * ttft,
            "tpot_p50_ms": 50.0,
            "completed": 4,
            "errors": 0,
        }

    records = []
    for round_index, (ours, vllm, rayllm) in enumerate([(95, 100, 80), (105, 100, 80)], 1):
        for system, tok_s, ttft in (
            ("ours", ours, 102.0),
            ("vllm", vllm, 100.0),
            ("rayllm", rayllm, 204.0),
        ):
            record = report.RunRecord(system, str(round_index))
            record.results["random c=1"] = metrics(tok_s, ttft)
            records.append(record)
    table = report.main_table(records, ["random c=1"], ["vllm", "rayllm", "ours"])
    assert "| random c=1 | poolserve | 100.0 (95.0-105.0) | 102 (102-102) |" in table
    assert "| random c=1 | **ours / bare vLLM** | **1.00x** | **1.02x (+2 ms)** |" in table
    assert "| random c=1 | **ours / Ray Serve LLM** | **1.25x** | **0.50x (-102 ms)** |" in table
