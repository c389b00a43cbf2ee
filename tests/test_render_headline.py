"""RESULTS.md's headline quality line: final rounds only. A run still in progress, or a DAC run stopped before
the end of its schedule, has a last row that is not a final round and must not be quoted there."""
from __future__ import annotations

from benchmarks.render import _headline_quality


def _dac(label: str, chain: list[float], seed: int = 31) -> dict:
    return {"label": label, "rounds": len(chain) - 1, "acc_by_round": chain, "train": {"seed": seed}}


def test_only_final_rounds_reach_the_headline():
    whole = [0.2] + [0.9] * 19 + [0.977]
    d = {
        "quality": {"runs": {"done": {"status": "finished", "last_row": {"acc": 0.8, "nmi": 0.7}},
                             "going": {"status": "in progress", "last_row": {"acc": 0.99, "nmi": 0.99}}}},
        "dac_ab": {"runs": [_dac("70k images, the preset", whole), _dac("70k images, stopped", [0.2, 0.95, 0.96]),
                            _dac("10k a", [0.2] * 20 + [0.96]), _dac("10k b", [0.2] * 20 + [0.94], 32)],
                   "groups": [{"name": "10k", "runs": ["10k a", "10k b"]}]},
    }
    line = "; ".join(_headline_quality(d))
    assert "`done` ACC 0.8" in line and "going" not in line and "0.99" not in line
    assert "DAC, MNIST 70k, seed 31 (dac_ab.json) ACC 0.977 after 20 rounds" in line
    assert line.count("DAC, MNIST 70k") == 1  # the stopped 70k run's last row is no final round
    assert "over 2 seeds, min 0.94" in line
