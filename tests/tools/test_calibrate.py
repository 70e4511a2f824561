"""``zipcache-vllm model calibrate``: per layer, whether rotated keys lower the attention
error, measured on text that no evaluation reads."""
from zipcache_vllm.eval import calibrate, corpus


def test_calibration_text_is_held_out_from_every_evaluation():
    """The prose splits into the evaluation text (``english_text``: every eval, benchmark
    and test prompt) and its end, which only calibration reads."""
    evaluation, held_out = corpus.english_text(), corpus.calibration_text()
    assert corpus._prose() == evaluation + "\n\n" + held_out
    assert len(held_out) >= corpus.CALIBRATION_CHARS
    assert len(evaluation) >= 200_000  # corpus_ids' default prefix stays evaluation text


def test_calibration_windows_come_from_the_held_out_text(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    held_out = tok(corpus.calibration_text(), add_special_tokens=False)["input_ids"]
    windows = calibrate._tail_windows(tok, calibrate.SEQ_LEN, calibrate.WINDOWS)
    body = [t for w in windows for t in w if t != tok.bos_token_id]
    assert len(windows) == calibrate.WINDOWS and body == held_out[:len(body)]


def test_measure_rotates_the_layers_where_rotation_clearly_wins(model_dir, one_intra_op_thread):
    """SmolLM2's layers 18 and 20 have the largest key-outlier errors: rotated keys lower
    them 2-3x in the shipped calibration, so one short window must agree. Near ties may
    go either way on another machine's float32 sums; only the clear cases are asserted."""
    data = calibrate.measure(str(model_dir), windows=1, seq_len=768, prompt_len=384, progress=False)
    rot = data["key_rotation"]
    assert len(rot["rotate"]) == 30 and all(e > 0 for e in rot["error_rotated"] + rot["error_unrotated"])
    assert rot["rotate"][18] and rot["rotate"][20] and data["unrotated_below"] == calibrate.UNROTATED_BELOW
    assert data["corpus"].endswith("calibration_text")
