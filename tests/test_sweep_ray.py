"""The Ray executor (each step a Ray task on a local Ray instance) gives the same results as the
local one."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

import workbench.sweep as sweep  # noqa: E402

pytestmark = pytest.mark.ray


def small_sweep(name: str) -> dict:
    return {
        "sweep": {"name": name},
        "models": [{"spec": "tiny-random", "name": "tiny", "hooks": ["blocks.*.hook_resid_post"]}],
        "corpus": {"spec": "builtin", "max_tokens": 1024, "seq_len": 32},
        "collect": {"batch_size": 8, "progress": False},
        "pca": {"k": 8},
        "train_sae": {"arch": "topk", "d_sae": 64, "k": [4, 80], "hooks": ["blocks.1.*"],
                      "progress": False},
        "eval_sae": {"ce_sequences": 4},
        "compare": {"metrics": ["linear_cka"]},
    }


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _assert_same_results(ws_a, df_a, ws_b, df_b):
    import torch
    from safetensors.torch import load_file

    def metrics(df):
        return {r["identity"]: {k: v for k, v in r.items() if k.startswith("metrics.") and v == v
                                and "second" not in k and "per_s" not in k}
                for r in df.to_dict("records") if r["outcome"] in ("done", "cached")}

    ma, mb = metrics(df_a), metrics(df_b)
    assert ma.keys() == mb.keys()
    for ident in ma:
        for k in ma[ident]:
            assert ma[ident][k] == pytest.approx(mb[ident][k], rel=1e-4, abs=1e-6), (ident, k)
    files = sorted(f.relative_to(ws_a) for f in ws_a.rglob("*.safetensors"))
    assert files and files == sorted(f.relative_to(ws_b) for f in ws_b.rglob("*.safetensors"))
    for f in files:
        ta, tb = load_file(ws_a / f), load_file(ws_b / f)
        assert ta.keys() == tb.keys()
        for t in ta:
            assert torch.allclose(ta[t].float(), tb[t].float(), atol=1e-5), (f, t)


def test_ray_executor_matches_local(ray_local, tmp_path):
    ws_ray, ws_local = tmp_path / "ray", tmp_path / "local"
    df_ray = sweep.run(small_sweep("ray"), workspace=ws_ray, executor="ray", progress=False)
    df_local = sweep.run(small_sweep("local"), workspace=ws_local, executor="local", progress=False)
    o_ray = dict(zip(df_ray["node"], df_ray["outcome"]))
    o_local = dict(zip(df_local["node"], df_local["outcome"]))
    assert o_ray == o_local
    # the impossible SAE (k > d_sae) fails in both, its eval is skipped, the rest is done
    assert sum(v == "failed" for v in o_ray.values()) == 1
    assert sum(v == "skipped" for v in o_ray.values()) == 1
    assert sum(v == "done" for v in o_ray.values()) == len(o_ray) - 2
    assert list(df_ray["identity"]) == list(df_local["identity"])
    _assert_same_results(ws_ray, df_ray, ws_local, df_local)
    # rerun on Ray: everything done is reused, only the failed step is tried again
    df2 = sweep.run(small_sweep("ray"), workspace=ws_ray, executor="ray", progress=False)
    o2 = dict(zip(df2["node"], df2["outcome"]))
    assert {k for k, v in o2.items() if v == "cached"} == {k for k, v in o_ray.items() if v == "done"}
