"""The per-block memory arithmetic behind the README's per-GPU table (bench/block_memory.py)."""
import pytest

from bench import block_memory as B


@pytest.mark.parametrize("name,published", [("llama-3-8b", 8.03e9), ("llama-3-70b", 70.55e9),
                                            ("qwen2.5-0.5b", 0.63e9), ("smollm2-135m", 0.1345e9)])
def test_parameter_counts_match_the_published_models(name, published):
    assert B.needs(name)["params_b"] * 1e9 == pytest.approx(published, rel=0.005)


def test_streamed_need_grows_with_the_mlp_width_not_the_depth():
    base = B.estimate_block_bytes(4096, 14336, 32, 8, tokens=1000)
    wider = B.estimate_block_bytes(4096, 2 * 14336, 32, 8, tokens=1000)
    assert wider["statistics"] == 4 * base["statistics"] == 4 * 5 * 14336 ** 2 * 8
    assert B.needs("llama-3-70b")["streamed_gib"] < B.needs("llama-3-70b")["in_memory_gib"] / 5


def test_gpu_table_picks_the_largest_model_that_fits():
    table = B.gpu_table()
    rows = {line.split(" = ")[0].strip("| "): line for line in table.splitlines() if " GiB |" in line}
    assert rows["16 GB"].endswith("| llama-3.2-3b (13.2) | qwen2.5-14b (14.2) |")
    assert rows["80 GB"].endswith("| qwen2.5-14b (60.5) | llama-3-70b (42.2) |")


def test_correction_comes_from_the_widest_measured_mlp():
    rows = [{"ff": 1536, "measured_mb": 300.0, "estimate_mb": 100.0},
            {"ff": 14336, "measured_mb": 1060.0, "estimate_mb": 1000.0}]
    assert B.correction(rows) == pytest.approx(1.06)
    assert B.correction([]) == 1.0
    assert B.needs("llama-3-70b", factor=1.06)["streamed_gib"] > B.needs("llama-3-70b")["streamed_gib"]
