"""Run the real vLLM engine in-process with ``--kv-cache-dtype zipcache`` and record, for a
few layers, every step's attention inputs and outputs (used by test_engine_fidelity.py).

    python tests/serving/_record_engine.py MODEL_DIR OUT.pt [TOKEN_BUDGET [LAYERS [KV_CACHE_DTYPE]]]

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the
recorder wrapped around the backend's ``apply_step`` sees every call. Prompts of awkward
lengths and the default token budget (200) make vLLM cut the prefills into chunks
mid-block and batch them with decode rows (a budget of 4096 prefills each prompt whole);
generation crosses a block boundary, so decode fills and packs a block. LAYERS:
comma-separated model layer indices to record (default: 4 of SmolLM2's 30); KV_CACHE_DTYPE:
default ``zipcache``. Each step records the layer's sliding window (None: full attention)
and whether its keys are stored rotated (the model's calibration).
"""
import os
import re
import sys

LAYERS = (0, 9, 18, 27)
PROMPT_LENS = (600, 301, 130)
MAX_TOKENS = 45  # 600 + 45 crosses the 640 block boundary during decode

if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    from zipcache_vllm.launcher import install_version_shim

    install_version_shim()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from zipcache_vllm.vllm_plugin import backend

    model_dir, out_path = sys.argv[1], sys.argv[2]
    budget = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    layers = tuple(int(x) for x in sys.argv[4].split(",")) if len(sys.argv) > 4 else LAYERS
    kv_cache_dtype = sys.argv[5] if len(sys.argv) > 5 else "zipcache"
    steps = []
    inner = backend.apply_step

    def recording_apply_step(pool, layer, plans, query, key, value, pages, layout, rule, scale,
                             output, decode=None, state=None, prepared=None, sliding_window=None):
        inner(pool, layer, plans, query, key, value, pages, layout, rule, scale, output, decode,
              state, prepared, sliding_window)
        name = next(n for n, i in pool.layer_index.items() if i == layer)
        layer = int(re.search(r"layers\.(\d+)\.", name).group(1))  # the pool's index -> the model's
        if layer in layers:
            steps.append({"layer": layer, "scale": scale, "preset_block": layout.block_size,
                          "sliding_window": sliding_window, "rotate_keys": layout.rotate_keys,
                          "rows": [(p.q_start, p.q_len, p.ctx, p.slot) for p in plans],
                          "q": query.clone(), "k": key.clone(), "v": value.clone(),
                          "out": output[:query.shape[0]].clone()})

    backend.apply_step = recording_apply_step
    from transformers import AutoTokenizer

    from zipcache_vllm.eval.offline import token_windows_for

    # Real text (the e2e fidelity test's corpus): its activations, not random tokens'.
    windows = token_windows_for(AutoTokenizer.from_pretrained(model_dir), max(PROMPT_LENS),
                                len(PROMPT_LENS))
    prompts = [w[:n] for w, n in zip(windows, PROMPT_LENS)]
    llm = LLM(model=model_dir, kv_cache_dtype=kv_cache_dtype, dtype="float32", enforce_eager=True,
              max_model_len=1024, max_num_seqs=4, max_num_batched_tokens=budget,
              enable_chunked_prefill=True, enable_prefix_caching=False, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seqs = [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, outs)]
    torch.save({"steps": steps, "seqs": seqs, "layers": layers, "kv_cache_dtype": kv_cache_dtype},
               out_path)
    print(f"recorded {len(steps)} layer steps")
