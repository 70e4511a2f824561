"""How much a cache's logprobs move under float noise far below its rounding steps.

Why the engine tests compare what they compare (tests/serving/test_engine_fidelity.py,
test_reliability_serving.py::test_tensor_parallel_3_matches_tp1): the engine's q/k differ
from the HF model's by float noise (another RoPE, TP's summation order), and a quantized
cache is a discontinuous function of its inputs. This replays one prompt of real text
through the offline simulator of a preset, once as is and then with Gaussian noise of
each given size added to q, k and v of one layer (or all), and prints the next-token
logprobs of the clean run's top tokens each time. Run it for the preset as shipped and
with its staging in the model's precision (``staging_bits`` unset):

    python scripts/noise_sensitivity.py [--preset zipcache] [--noise 1e-7,1e-6,1e-5]
        [--layers all|0,10] [--offset 12000] [--length 300] [--model DIR]

Deterministic (seeded noise); about a second per replay on two cores.
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    from zipcache_vllm.config import load_preset
    from zipcache_vllm.eval.corpus import corpus_ids
    from zipcache_vllm.eval.offline import load_model, reference_logprobs, simulated_logprobs
    from zipcache_vllm.eval.simulate import KVSimulator, SimConfig
    from zipcache_vllm.model.prepare import default_model_dir
    from zipcache_vllm.policies import make_policy

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: the prepared default model)")
    ap.add_argument("--preset", default="zipcache")
    ap.add_argument("--noise", default="1e-7,1e-6,1e-5", help="standard deviations, comma-separated")
    ap.add_argument("--layers", default="all", help="'all' or layer indices, comma-separated")
    ap.add_argument("--offset", type=int, default=12_000, help="prompt start in the project's corpus")
    ap.add_argument("--length", type=int, default=300, help="prompt tokens")
    ap.add_argument("--top", type=int, default=3)
    args = ap.parse_args()

    model, tok = load_model(args.model or str(default_model_dir()))
    prompt = corpus_ids(tok)[args.offset:args.offset + args.length]
    ids = torch.tensor(prompt + [0])
    layers = None if args.layers == "all" else {int(x) for x in args.layers.split(",")}
    shipped = load_preset(args.preset)
    variants = {f"{args.preset} (staging_bits={shipped.staging_bits})": shipped}
    if shipped.staging_bits is not None:
        variants[f"{args.preset} (staging_bits=None)"] = shipped.model_copy(update={"staging_bits": None})
    clean = reference_logprobs(model, ids, len(prompt) - 1)[0]
    watch = clean.topk(args.top).indices
    names = [repr(tok.convert_ids_to_tokens(int(i))) for i in watch]
    print(f"prompt: corpus[{args.offset}:{args.offset + args.length}], noise on q, k, v of layers "
          f"{args.layers}; next-token logprobs of {', '.join(names)}")
    print(f"{'uncompressed':<40} {'':>8} " + " ".join(f"{float(clean[i]):9.4f}" for i in watch))

    def replay(preset, noise: float) -> torch.Tensor:
        policy = make_policy(preset)
        sim = KVSimulator(policy, SimConfig(prefill_len=0, chunk_size=preset.block_size))
        gen = torch.Generator().manual_seed(0)

        def attention(module, q, k, v, *a, **kw):
            if noise and (layers is None or module.layer_idx in layers):
                q, k, v = (x + noise * torch.randn(x.shape, generator=gen) for x in (q, k, v))
            return sim(module, q, k, v, *a, **kw)

        return simulated_logprobs(model, attention, ids, len(prompt) - 1)[0]

    for name, preset in variants.items():
        base = replay(preset, 0.0)
        print(f"{name:<40} {'noise 0':>8} " + " ".join(f"{float(base[i]):9.4f}" for i in watch))
        for noise in (float(x) for x in args.noise.split(",")):
            lp = replay(preset, noise)
            moved = float((lp[watch] - base[watch]).abs().max())
            print(f"{'':<40} {noise:8.0e} " + " ".join(f"{float(lp[i]):9.4f}" for i in watch)
                  + f"   max move {moved:.4f}")


if __name__ == "__main__":
    main()
