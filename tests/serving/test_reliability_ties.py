"""The batched-vs-alone comparison of ``reliability.ties`` on a fake server (no engine)."""
from __future__ import annotations

from zipcache_vllm.reliability import ties


class FakeServer:
    """Answers prompt [i] with tokens that differ batched vs alone only for prompt 1, at token 2."""

    def __init__(self):
        self.calls, self.preemptions = 0, 0.0

    def metric(self, name):
        assert name == "vllm:num_preemptions_total"
        return self.preemptions

    def complete(self, prompt, **kw):
        assert kw["logprobs"] == 2 and kw["max_tokens"] == ties.TOKENS
        self.calls += 1
        batched = self.calls <= 2
        if batched:
            self.preemptions += 0.5
        toks = ["a", "b", "c" if (batched and prompt == [1]) else "d"]
        top = [{t: -0.5, "z": -0.5} for t in toks]
        return {"status": 200, "json": {"choices": [{"logprobs": {
            "tokens": toks, "token_logprobs": [-0.5, -0.5 - 0.01 * batched, -0.5], "top_logprobs": top}}]}}


def test_compare_finds_the_first_difference_and_the_gap_before_it():
    preempted, rows = ties.compare(FakeServer(), [[0], [1]])
    assert preempted == 1.0
    assert rows[0]["first_difference"] is None and rows[0]["together_top2"] is None
    assert abs(rows[0]["max_logprob_gap_before"] - 0.01) < 1e-9
    assert rows[1]["first_difference"] == 2
    assert rows[1]["together_top2"] == {"c": -0.5, "z": -0.5} and rows[1]["alone_top2"] == {"d": -0.5, "z": -0.5}
    assert abs(rows[1]["max_logprob_gap_before"] - 0.01) < 1e-9
