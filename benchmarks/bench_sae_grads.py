"""Benchmark: the weight gradients of one TopK training step (the sparse encoder's W_enc and the sparse
decoder's W_dec), given the selected entries (batch x k) and the upstream gradients. Ours
(``analyses.sae.base._latent_sum``: one stable sort of the entries by latent, shared, then each gradient is
one ``embedding_bag`` forward written straight into the parameter's layout: W_enc is stored column-major)
against what the step did before (a sparse COO matmul for W_enc plus the copy into W_enc's row-major layout,
``embedding_bag``'s own backward for W_dec) and SAELens' form (dense [batch, d_sae] activations, both
gradients as dense GEMMs by autograd). Each checks its gradients against ours first. Then a whole TopK step
(``training_forward``, backward, parameter-gradient step, Adam) in float32 and with bf16 autocast (``train-sae
--autocast on``; on CPU it pays only with bf16 matrix units such as AMX).

    .venv/bin/python benchmarks/bench_sae_grads.py [--d-sae 4608 16384] [--batch-size 4096] [--device auto]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from _args import parse
from bench_sae_aux import timer

from analyses.sae.base import SparseActs, TrainStepInput, _latent_sum
from analyses.sae.train import make_sae
from workbench.models import resolve_device


def kernels(n: int, d_in: int, d_sae: int, k: int, dev: torch.device) -> dict:
    """The three ways, as closures over one random problem of this size."""
    g = torch.Generator(device=dev).manual_seed(0)
    x_in = torch.randn(n, d_in, device=dev, generator=g)
    gout = torch.randn(n, d_in, device=dev, generator=g)
    vals, idx = torch.randn(n, d_sae, device=dev, generator=g).topk(k, dim=1, sorted=False)
    gv = torch.randn(n * k, device=dev, generator=g)             # d loss / d value of each entry
    acts = SparseActs.from_topk(vals.relu(), idx, d_sae)
    rows, cols, v = acts.rows, acts.indices, acts.values
    W_enc_rm = torch.empty(d_in, d_sae, device=dev)              # the old row-major parameter layout

    def ours():
        acts._by_latent = None
        order = acts.by_latent()
        return _latent_sum(x_in, rows, gv, *order).t(), _latent_sum(gout, rows, v, *order)

    def before():
        S = torch.sparse_coo_tensor(torch.stack([cols, rows]), gv, (d_sae, n), is_coalesced=False,
                                    check_invariants=False)
        gW_enc = W_enc_rm.copy_(torch.sparse.mm(S, x_in).t())
        W = torch.zeros(d_sae, d_in, device=dev, requires_grad=True)
        F.embedding_bag(cols, W, acts.offsets, mode="sum", per_sample_weights=v).backward(gout)
        return gW_enc, W.grad

    def dense():
        G = torch.zeros(n, d_sae, device=dev).index_put_((rows, cols), gv)
        A = torch.zeros(n, d_sae, device=dev).index_put_((rows, cols), v)
        return x_in.t() @ G, A.t() @ gout
    return {"ours": ours, "before": before, "dense": dense}


def step_ms(n: int, d_in: int, d_sae: int, k: int, dev: torch.device, autocast: bool, repeats: int) -> float:
    """Median ms of a whole TopK training step."""
    import time
    torch.manual_seed(0)
    sae = make_sae("topk", d_in, d_sae, k, device=str(dev))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=(0.0, 0.999), fused=dev.type in ("cpu", "cuda"))
    xs = torch.randn(repeats + 2, n, d_in, device=dev) * 3
    ws: dict = {}
    ts = []
    for x in xs:
        t = time.perf_counter()
        inp = TrainStepInput(x=x, denom=(x - x.mean(0)).pow(2).sum(), n_global=n, workspace=ws)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            out = sae.training_forward(inp)
        out.loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts[2:])[len(ts[2:]) // 2] * 1e3


def main() -> None:
    a = parse(__doc__, d_sae=[4608, 16384], batch_size=[1024, 4096], d_in=576, k=32, repeats=10, device="auto")
    dev = resolve_device(a.device)
    timed = timer(dev, a.repeats)
    print(f"device: {dev} ({torch.get_num_threads()} threads); d_in {a.d_in}, k {a.k}; ms for both weight "
          "gradients of a step (lower is better)")
    print(f"{'d_sae':>6} {'batch':>6} {'ours':>8} {'before':>8} {'dense':>8} {'before/ours':>12} {'dense/ours':>11}")
    for d_sae in a.d_sae:
        for n in a.batch_size:
            fs = kernels(n, a.d_in, d_sae, a.k, dev)
            ref = fs["ours"]()
            for name in ("before", "dense"):
                for r, o in zip(fs[name](), ref):
                    torch.testing.assert_close(r, o, atol=1e-3, rtol=1e-4)
            t = [timed(fs[name]) for name in ("ours", "before", "dense")]
            print(f"{d_sae:>6} {n:>6} {t[0]:>8.1f} {t[1]:>8.1f} {t[2]:>8.1f} {t[1] / t[0]:>11.2f}x "
                  f"{t[2] / t[0]:>10.2f}x")
    print(f"whole TopK step, median ms: {'d_sae':>6} {'batch':>6} {'float32':>8} {'bf16 autocast':>14} {'ratio':>6}")
    for d_sae in a.d_sae:
        for n in a.batch_size:
            f32, bf = (step_ms(n, a.d_in, d_sae, a.k, dev, ac, a.repeats) for ac in (False, True))
            print(f"{'':28}{d_sae:>6} {n:>6} {f32:>8.1f} {bf:>14.1f} {f32 / bf:>5.2f}x")


if __name__ == "__main__":
    main()
