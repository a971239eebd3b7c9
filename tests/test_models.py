"""workbench.models: activations against plain Hugging Face forwards, hook naming, early stop,
padding, specs and errors. smollm2 tests are marked slow (the first run converts the GGUF once)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.models import list_specs, load_model, load_tokenizer

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random", device="cpu")


@pytest.fixture(scope="module")
def tiny_hf(tiny):
    """An independent HF instance of the same weights (the bridge wraps its own copy)."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny.source, attn_implementation="eager")
    return m.eval()


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm-l6", device="cpu")


def _ids(model, n=3, s=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, min(model.vocab_size, 20000), (n, s), generator=g)


def _hf_capture(hf, modules: dict, ids, mask=None, output=lambda o: o[0] if isinstance(o, tuple) else o,
                pre: dict | None = None):
    """Run the HF model with forward hooks; {key: tensor} from module outputs (and pre-hook inputs)."""
    got, handles = {}, []
    for key, mod in modules.items():
        handles.append(mod.register_forward_hook(
            lambda m, i, o, key=key: got.__setitem__(key, output(o).detach().clone())))
    for key, mod in (pre or {}).items():
        handles.append(mod.register_forward_pre_hook(
            lambda m, i, key=key: got.__setitem__(key, i[0].detach().clone())))
    try:
        with torch.no_grad():
            out = hf(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    return got, out


# ------------------------------------------------------------------------------- tiny-random

def test_tiny_basics(tiny):
    assert tiny.name == "tiny-random" and tiny.kind == "causal"
    assert (tiny.n_layers, tiny.d_model) == (2, 64)
    assert tiny.tokenizer.pad_token is not None
    assert tiny.special_ids["pad"] == tiny.tokenizer.pad_token_id
    assert tiny.special_ids["bos"] is None or isinstance(tiny.special_ids["bos"], int)
    assert set(tiny.special_ids) == {"bos", "eos", "pad", "cls", "sep"}
    for h in ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.0.hook_attn_out",
              "blocks.0.hook_mlp_out", "blocks.0.attn.hook_z", "blocks.1.hook_resid_mid"]:
        assert h in tiny.hook_names, h
    assert tiny.d("blocks.1.hook_resid_post") == 64
    assert tiny.d("blocks.0.mlp.hook_post") == 128
    assert tiny.d("blocks.0.attn.hook_z") == 64          # 4 heads x 16, flattened
    assert tiny.layer_of("hook_embed") == -1
    assert tiny.layer_of("blocks.1.hook_mlp_out") == 1
    assert tiny.layer_of("blocks.0.hook_out") == 0        # bridge alias
    assert tiny.W_U.shape == (64, tiny.vocab_size)
    assert torch.equal(tiny.W_U, tiny.hf_model.lm_head.weight.T)


def test_tiny_matches_hf(tiny, tiny_hf):
    ids = _ids(tiny)
    L = tiny_hf.model.layers
    mods = {"hook_embed": tiny_hf.model.embed_tokens}
    pre = {}
    for i in range(2):
        mods[f"blocks.{i}.hook_resid_post"] = L[i]
        mods[f"blocks.{i}.hook_attn_out"] = L[i].self_attn
        mods[f"blocks.{i}.hook_mlp_out"] = L[i].mlp
        pre[f"blocks.{i}.attn.hook_z"] = L[i].self_attn.o_proj
        pre[f"blocks.{i}.mlp.hook_post"] = L[i].mlp.down_proj
    ref, out = _hf_capture(tiny_hf, mods, ids, pre=pre)
    acts = tiny.run(ids, None, list(ref))
    assert list(acts) == list(ref)
    for k, v in ref.items():
        assert acts[k].shape == v.shape, k
        assert (acts[k] - v).abs().max().item() <= ATOL, k
    assert (tiny.logits(ids) - out.logits).abs().max().item() <= ATOL


def test_tiny_is_deterministic_and_cached_atomically(tmp_path, monkeypatch, tiny):
    from workbench._model_cache import MARKER, cache_root
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    root = cache_root()
    # a half-written folder (no completion marker) must never be used
    from workbench.models import _parse_tiny, _tiny_name
    half = root / _tiny_name(_parse_tiny("tiny-random"))
    half.mkdir(parents=True)
    (half / "config.json").write_text("{ not json")
    m = load_model("tiny-random", device="cpu")
    assert Path(m.source).parent == root and (Path(m.source) / MARKER).is_file()
    assert not list(root.glob(".*.tmp-*"))
    for (n1, p1), (n2, p2) in zip(m.hf_model.named_parameters(), tiny.hf_model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    other = load_model("tiny-random:seed=1,layers=3", device="cpu")
    assert other.n_layers == 3
    assert not torch.equal(other.hf_model.lm_head.weight, m.hf_model.lm_head.weight)


def test_early_stop_same_values_and_skips_later_blocks(tiny):
    ids = _ids(tiny, seed=1)
    full = tiny.run(ids, None, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "ln_final.hook_out"])
    calls = []
    h = tiny.hf_model.model.layers[1].register_forward_pre_hook(lambda *a: calls.append(1))
    h2 = tiny.hf_model.lm_head.register_forward_pre_hook(lambda *a: calls.append(2))
    try:
        early = tiny.run(ids, None, ["blocks.0.hook_resid_post"])
        assert calls == []                                   # block 1 and the unembedding never ran
        tiny.run(ids, None, ["blocks.1.hook_resid_post"])
        assert calls == [1]
    finally:
        h.remove()
        h2.remove()
    assert torch.equal(early["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"])
    # and the values equal what a full forward to logits sees at that hook
    seen = {}
    tiny.logits(ids, hook="blocks.0.hook_resid_post", replace=lambda a: seen.setdefault("a", a.clone()))
    assert torch.equal(seen["a"], full["blocks.0.hook_resid_post"])
    # a stopped run leaves no hooks behind
    assert all(not hp.fwd_hooks for hp in tiny.bridge.hook_dict.values())


def test_right_padding_does_not_change_real_tokens(tiny):
    tok = tiny.tokenizer
    texts = ["the cat sat on the mat and looked around", "hello", "a somewhat longer sentence of words"]
    batch = tok(texts, padding=True, return_tensors="pt")
    hooks = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"]
    acts = tiny.run(batch["input_ids"], batch["attention_mask"], hooks)
    for i, t in enumerate(texts):
        one = tok([t], return_tensors="pt")
        n = one["input_ids"].shape[1]
        assert int(batch["attention_mask"][i].sum()) == n
        single = tiny.run(one["input_ids"], one["attention_mask"], hooks)
        for h in hooks:
            assert (acts[h][i, :n] - single[h][0]).abs().max().item() <= ATOL, (i, h)


def test_aliases_and_patterns(tiny):
    assert tiny.resolve_hooks("blocks.*.hook_resid_post") == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert tiny.resolve_hooks(["blocks.{1,0}.hook_mlp_out"]) == ["blocks.1.hook_mlp_out", "blocks.0.hook_mlp_out"]
    assert tiny.resolve_hooks("blocks.{0..1}.hook_resid_pre") == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    # a glob over bridge names returns each hook point once
    assert tiny.resolve_hooks("blocks.0.hook_out") == ["blocks.0.hook_out"]
    assert tiny.canonical("blocks.0.hook_out") == "blocks.0.hook_resid_post"
    assert "blocks.0.hook_out" in tiny.aliases("blocks.0.hook_resid_post")
    ids = _ids(tiny, seed=2)
    acts = tiny.run(ids, None, ["blocks.0.hook_out", "blocks.0.hook_resid_post"])
    assert list(acts) == ["blocks.0.hook_out", "blocks.0.hook_resid_post"]   # keyed as asked
    assert torch.equal(acts["blocks.0.hook_out"], acts["blocks.0.hook_resid_post"])
    glob = tiny.run(ids, None, "blocks.*.hook_resid_post")
    assert list(glob) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_bad_hooks(tiny):
    with pytest.raises(WorkbenchError, match="blocks.0.hook_resid_post"):
        tiny.resolve_hooks(["blocks.0.hook_resid_pots"])
    with pytest.raises(WorkbenchError, match="n_layers=2"):
        tiny.resolve_hooks(["blocks.7.hook_resid_post"])
    with pytest.raises(WorkbenchError, match="n_layers=2"):
        tiny.run(_ids(tiny), None, ["blocks.{0,5}.hook_resid_post"])
    with pytest.raises(WorkbenchError, match="matches no hook"):
        tiny.resolve_hooks("blocks.*.hook_nothing")
    with pytest.raises(WorkbenchError):
        tiny.d("nonsense")
    with pytest.raises(WorkbenchError, match="token ids"):
        tiny.run(torch.tensor([[0, tiny.vocab_size]]), None, ["blocks.0.hook_resid_post"])
    with pytest.raises(WorkbenchError, match="does not match"):
        tiny.run(_ids(tiny), torch.ones(3, 4), ["blocks.0.hook_resid_post"])


def test_logits_splice(tiny):
    ids = _ids(tiny, seed=3)
    clean = tiny.logits(ids)
    same = tiny.logits(ids, hook="blocks.0.hook_resid_post", replace=lambda a: a)
    assert torch.equal(clean, same)
    zero = tiny.logits(ids, hook="blocks.0.hook_resid_post", replace=torch.zeros_like)
    assert (zero - clean).abs().max() > 1e-3
    # splicing at the last block's output equals applying final norm + unembedding to the replaced act
    z = tiny.logits(ids, hook="blocks.1.hook_resid_post", replace=lambda a: 2 * a)
    acts = tiny.run(ids, None, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    ref = tiny.hf_model.lm_head(tiny.hf_model.model.norm(2 * acts))
    assert (z - ref).abs().max().item() <= ATOL
    zh = tiny.logits(ids, hook="blocks.0.attn.hook_z", replace=torch.zeros_like)   # [b,s,h*dh] view
    assert zh.shape == clean.shape
    with pytest.raises(WorkbenchError, match="shape"):
        tiny.logits(ids, hook="blocks.0.hook_resid_post", replace=lambda a: a[..., :3])
    with pytest.raises(WorkbenchError):
        tiny.logits(ids, hook="blocks.0.hook_resid_post")


def test_dtype_option():
    m = load_model("tiny-random", device="cpu", dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    a = m.run(torch.tensor([[5, 6, 7]]), None, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    assert a.dtype == torch.bfloat16 and torch.isfinite(a.float()).all()
    assert str(load_model("tiny-random").device) in ("cpu", "cuda:0", "cuda")


# ---------------------------------------------------------------------------------- specs, errors

def test_unknown_spec_lists_valid_specs():
    with pytest.raises(WorkbenchError, match="smollm2-135m"):
        load_model("definitely-not-a-model")
    with pytest.raises(WorkbenchError, match="no such model folder"):
        load_model("./no/such/folder")
    with pytest.raises(WorkbenchError, match="not found"):
        load_model("/no/such/file.gguf")
    with pytest.raises(WorkbenchError, match="tiny-random option"):
        load_model("tiny-random:layerz=2")


def test_hub_name_offline_fails_fast():
    code = ("import time, sys\n"
            "from workbench.models import load_model\n"
            "from workbench.errors import WorkbenchError\n"
            "for name in ['gpt2', 'workbench-test-org/not-a-real-model']:\n"
            "    t = time.time()\n"
            "    try:\n"
            "        load_model(name)\n"
            "        print('LOADED', name)\n"
            "    except WorkbenchError as e:\n"
            "        print(round(time.time() - t, 2), e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    for line in lines:
        if line.startswith("LOADED gpt2"):        # already in this machine's HF cache: fine
            continue
        secs, msg = line.split(" ", 1)
        assert float(secs) < 5, line
        assert "not available offline" in msg and "smollm2-135m" in msg, line


def test_list_specs_and_tokenizer(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    specs = {s["spec"]: s for s in list_specs()}
    for name in ("smollm2-135m", "minilm-l6", "tiny-random"):
        assert specs[name]["available"] is True
        assert set(specs[name]) == {"spec", "description", "available", "reason"}
    assert specs["gpt2"]["available"] in (True, False)
    tok = load_tokenizer("minilm-l6")
    assert tok.pad_token is not None
    assert tok.decode(tok("hello world")["input_ids"], skip_special_tokens=True) == "hello world"
    assert load_tokenizer("tiny-random").pad_token == "[PAD]"


# ---------------------------------------------------------------------------------------- minilm

def test_minilm_matches_hf(minilm):
    from transformers import BertModel
    from workbench.models import minilm_dir
    hf = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager").eval()
    assert minilm.kind == "encoder" and minilm.n_layers == 6 and minilm.d_model == 384
    assert minilm.W_U is None
    tok = minilm.tokenizer
    batch = tok(["The quick brown fox jumps over the lazy dog.", "Short one."], padding=True, return_tensors="pt")
    mods = {f"blocks.{i}.attn.o.hook_out": hf.encoder.layer[i].attention.output.dense for i in range(6)}
    ref, _ = _hf_capture(hf, mods, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        hs = hf(**batch, output_hidden_states=True).hidden_states
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(6)] + list(mods) + ["hook_embed"]
    acts = minilm.run(batch["input_ids"], batch["attention_mask"], hooks)
    real = batch["attention_mask"].bool()
    for i in range(6):
        assert (acts[f"blocks.{i}.hook_resid_post"][real] - hs[i + 1][real]).abs().max().item() <= ATOL, i
        k = f"blocks.{i}.attn.o.hook_out"
        assert (acts[k][real] - ref[k][real]).abs().max().item() <= ATOL, k
    assert (acts["hook_embed"][real] - hs[0][real]).abs().max().item() <= ATOL
    with pytest.raises(WorkbenchError, match="encoder"):
        minilm.logits(batch["input_ids"])


def test_minilm_padding_and_early_stop(minilm):
    tok = minilm.tokenizer
    texts = ["Padding must not change real tokens in an encoder.", "Tiny."]
    batch = tok(texts, padding=True, return_tensors="pt")
    h = ["blocks.2.hook_resid_post", "blocks.5.hook_resid_post"]
    acts = minilm.run(batch["input_ids"], batch["attention_mask"], h)
    one = tok([texts[1]], return_tensors="pt")
    n = one["input_ids"].shape[1]
    single = minilm.run(one["input_ids"], one["attention_mask"], h)
    for k in h:
        assert (acts[k][1, :n] - single[k][0]).abs().max().item() <= ATOL
    early = minilm.run(batch["input_ids"], batch["attention_mask"], ["blocks.2.hook_resid_post"])
    assert torch.equal(early["blocks.2.hook_resid_post"], acts["blocks.2.hook_resid_post"])
    assert not any(n.startswith(("unembed", "mlm_head", "ln_final")) for n in minilm.hook_names)


# --------------------------------------------------------------------------------------- smollm2

@pytest.fixture(scope="module")
def smol():
    t = time.time()
    m = load_model("smollm2-135m", device="cpu")
    print(f"\nsmollm2-135m load (incl. any first conversion): {time.time() - t:.1f}s")
    return m


@pytest.mark.slow
def test_smollm2_is_real(smol):
    assert smol.kind == "causal" and smol.n_layers == 30 and smol.d_model == 576
    from workbench._model_cache import is_complete
    assert is_complete(smol.source)
    tok = smol.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    for _ in range(3):                         # greedy decoding through the bridge
        nxt = smol.logits(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    text = tok.decode(ids[0])
    assert "Paris" in text, text


@pytest.mark.slow
def test_smollm2_matches_hf_and_stops_early(smol):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(smol.source, attn_implementation="eager").eval()
    tok = smol.tokenizer
    batch = tok(["Sparse autoencoders find features.", "Hi"], padding=True, return_tensors="pt")
    layers = [0, 6, 15]
    mods = {f"blocks.{i}.hook_resid_post": hf.model.layers[i] for i in layers}
    ref, _ = _hf_capture(hf, mods, batch["input_ids"], batch["attention_mask"])
    calls = []
    h = smol.hf_model.model.layers[16].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        acts = smol.run(batch["input_ids"], batch["attention_mask"], list(mods))
    finally:
        h.remove()
    assert calls == []
    real = batch["attention_mask"].bool()
    for k in mods:
        assert (acts[k][real] - ref[k][real]).abs().max().item() <= 1e-3, k
    assert smol.d("blocks.3.attn.hook_k") == 3 * 64        # GQA: 3 kv heads
    assert smol.special_ids["eos"] is not None and smol.tokenizer.pad_token is not None


def test_local_folder_spec(tiny):
    m = load_model(tiny.source, device="cpu")
    assert m.name == tiny.source and m.kind == "causal" and m.n_layers == 2
    ids = _ids(tiny, seed=5)
    a = m.run(ids, None, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    b = tiny.run(ids, None, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    assert torch.equal(a, b)
    with pytest.raises(WorkbenchError, match="config.json"):
        load_model(str(Path(tiny.source).parent.parent))     # a folder, but not a model folder


@pytest.mark.slow
def test_gguf_file_spec_and_tokenizer(smol):
    from workbench.models import smollm2_gguf_path
    t = time.time()
    tok = load_tokenizer("smollm2-135m")
    assert time.time() - t < 10 and tok.pad_token is not None
    assert tok("Hello world")["input_ids"] == smol.tokenizer("Hello world")["input_ids"]
    m = load_model(str(smollm2_gguf_path()), device="cpu")      # same file: same cached folder
    assert m.source == smol.source and m.n_layers == 30
