"""benchmarks/gpu.sh: the FLOP count and peak table it uses, and a CPU smoke run of the script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_bench import bf16_peak, topk_sae_flops_per_token  # noqa: E402


def test_topk_flops_match_torch_flop_counter():
    """4 d n + 6 d k per token: what torch counts for a dense-encoder, k-row-decoder TopK step."""
    from torch.utils.flop_counter import FlopCounterMode
    b, d, n, k = 8, 16, 64, 4
    x = torch.randn(b, d)
    W_enc = torch.randn(d, n, requires_grad=True)
    W_dec = torch.randn(n, d, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        pre = torch.relu(x @ W_enc)
        vals, idx = pre.topk(k, dim=1)
        x_hat = torch.bmm(vals[:, None, :], W_dec[idx]).squeeze(1)     # decode only the k rows
        ((x_hat - x) ** 2).sum().backward()
    assert fc.get_total_flops() == b * topk_sae_flops_per_token(d, n, k)


def test_bf16_peak_table():
    assert bf16_peak("NVIDIA H200") == 989.0
    assert bf16_peak("NVIDIA H100 80GB HBM3") == 989.0          # torch's name for the SXM part
    assert bf16_peak("NVIDIA H100 SXM5 80GB") == 989.0
    assert bf16_peak("NVIDIA H100") == 756.0                     # unknown form factor: the lower figure
    assert bf16_peak("NVIDIA H100 PCIe") == 756.0
    assert bf16_peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert bf16_peak("Tesla T4") is None


@pytest.mark.slow
def test_gpu_script_cpu_smoke(tmp_path):
    out = tmp_path / "table.json"
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--cpu-smoke", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    table = json.loads(out.read_text())
    assert [r["stage"] for r in table["rows"]] == ["collect", "pca", "cka", "sae_topk"]
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in table["rows"])
    assert table["rows"][0]["tokens"] == 2048
    assert "sae_topk" in res.stdout and "tokens/s" in res.stdout
