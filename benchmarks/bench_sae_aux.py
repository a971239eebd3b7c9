"""Benchmark: the cost of one TopK training step's AuxK term (dead latents reconstruct the residual), by the
number of dead latents: our dense path (GEMMs over the dead latents' columns), our sparse path (gathers over
the batch x k_aux selected entries) and SAELens' form (the full [batch, d_sae] masked activations times
W_dec, by autograd). Each is timed as (forward + backward of the whole step) minus the same step without
AuxK, so the number is what AuxK adds. On CPU it also times the pre-activation GEMM into a fresh tensor vs
the trainer's reused buffer (``analyses.sae.base.preacts``), and ``torch.topk`` vs our grouped ``topk_rows``.

    .venv/bin/python benchmarks/bench_sae_aux.py [--d-sae 4608 16384] [--dead 300 1000 3000 6000] [--device auto]

``AUX_DENSE_RATIO`` (the dense path is taken while n_dead <= ratio x k_aux) comes from this table.
"""

from __future__ import annotations

import time

import torch

from _args import parse

import analyses.sae.base as base
from analyses.sae.base import TrainStepInput, topk_rows
from analyses.sae.train import make_sae


def saelens_aux(sae, x, pre, dead, residual, coef):
    """The shape of SAELens 6.x calculate_topk_aux_loss: the top k_aux of hidden_pre among the dead latents,
    scattered into a dense [n, d_sae] and decoded by the full W_dec (normalisation left out: it costs nothing)."""
    k_aux = x.shape[1] // 2
    masked = torch.where(dead[None], pre, torch.full_like(pre, -torch.inf))
    v, i = masked.topk(min(k_aux, int(dead.sum())), dim=-1, sorted=False)
    acts = torch.zeros_like(pre).scatter(-1, i, v.relu())
    e_hat = acts @ sae.W_dec
    return coef * (e_hat - residual).pow(2).sum()


def timer(dev: torch.device, repeats: int):
    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(f) -> float:
        f()
        sync()
        t = time.perf_counter()
        for _ in range(repeats):
            f()
        sync()
        return (time.perf_counter() - t) / repeats * 1e3
    return timed


def bench_width(a, dev: torch.device, d_sae: int, timed) -> None:
    sae = make_sae("topk", a.d_in, d_sae, a.k, device=str(dev))
    x = torch.randn(a.batch_size, a.d_in, device=dev)
    denom = (x - x.mean(0)).pow(2).sum()
    ws: dict = {}
    ratio0 = base.AUX_DENSE_RATIO

    def step(dead, ratio):
        base.AUX_DENSE_RATIO = ratio
        out = sae.training_forward(TrainStepInput(x=x, denom=denom, n_global=a.batch_size, dead_mask=dead,
                                                  workspace=ws))
        out.loss.backward()
        sae.zero_grad(set_to_none=True)

    def saelens_form(dead):
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        saelens_aux(sae, x, pre, dead, torch.randn_like(x), 0.1).backward()
        sae.zero_grad(set_to_none=True)

    for n_dead in [n for n in a.dead if n <= d_sae]:
        dead = torch.zeros(d_sae, dtype=torch.bool, device=dev)
        dead[torch.randperm(d_sae, device=dev)[:n_dead]] = True
        t_none = timed(lambda: step(None, ratio0))          # again each time: the machine's speed drifts
        t_dense = timed(lambda d=dead: step(d, float("inf"))) - t_none
        t_sparse = timed(lambda d=dead: step(d, 0)) - t_none
        t_sl = timed(lambda d=dead: saelens_form(d))
        picked = "dense" if n_dead <= ratio0 * min(a.d_in // 2, n_dead) else "sparse"
        print(f"d_sae {d_sae:6d}  dead {n_dead:6d}: AuxK adds dense {t_dense:7.0f} ms  sparse {t_sparse:7.0f} ms"
              f"  | SAELens-form (dense [n, d_sae], incl. its encode) {t_sl:7.0f} ms"
              f"  | step without AuxK {t_none:5.0f} ms; the default takes {picked}")
    base.AUX_DENSE_RATIO = ratio0
    if dev.type == "cpu":
        buf = torch.empty(a.batch_size, d_sae)
        b, W = sae.b_enc.detach(), sae.W_enc.detach()
        t_fresh = timed(lambda: torch.addmm(b, x, W))
        t_buf = timed(lambda: torch.addmm(b, x, W, out=buf))
        print(f"d_sae {d_sae:6d}  pre-activation GEMM: fresh tensor {t_fresh:.0f} ms, reused buffer {t_buf:.0f} ms"
              f" ({t_fresh / t_buf:.2f}x)")
        t_topk = timed(lambda: buf.topk(a.k, dim=-1, sorted=False))
        t_rows = timed(lambda: topk_rows(buf, a.k))
        print(f"d_sae {d_sae:6d}  top-{a.k} of every row: torch.topk {t_topk:.0f} ms, topk_rows {t_rows:.0f} ms"
              f" ({t_topk / t_rows:.2f}x)")


def main() -> None:
    a = parse(__doc__, d_sae=[4608, 16384], dead=[300, 1000, 3000, 6000], batch_size=4096, d_in=576, k=32,
              repeats=3, device="auto")
    dev = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device: {dev} ({name}); batch {a.batch_size}, d_in {a.d_in}, k {a.k}, k_aux {a.d_in // 2}; "
          f"AUX_DENSE_RATIO {base.AUX_DENSE_RATIO}")
    torch.manual_seed(0)
    for d_sae in a.d_sae:
        bench_width(a, dev, d_sae, timer(dev, a.repeats))


if __name__ == "__main__":
    main()
